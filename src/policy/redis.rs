//! The shared limiter: every replica pointing at one Redis (`REDIS_URL`) keeps each client's
//! per-minute windows, concurrency and daily budget there, so a limit means the same with one
//! replica or ten.
//!
//! Each decision is one round trip: [`ACQUIRE`] checks every limit of the client and, when all
//! pass, charges them all (a refusal charges nothing). A request's settlement (its place given
//! back, its estimate replaced by the tokens used) does not cost a round trip of its own: it
//! waits up to [`SETTLE_DELAY`] for the client's next decision and rides in the same script call,
//! applied before the decision; if none comes by then, [`SETTLE`] sends every settlement of the
//! client waiting, in one call. Scripts read the time from Redis
//! (`redis.call('TIME')`), so the replicas' clocks do not matter. The arithmetic is the in-process
//! limiter's ([`super::memory`]), in microseconds: GCRA theoretical arrival times for requests and
//! tokens, a refusal's `Retry-After` being the longest wait of the limits that failed.
//!
//! Keys, all `llm-proxy:{client:<name>}:...` (one Redis Cluster hash tag per client, so every
//! key a script touches is in one slot), each with an expiry:
//!
//! - `:rpm`, `:tpm`: the request and token TATs, expiring when they are in the past (a TAT in
//!   the past counts as now, so a missing key is the same state);
//! - `:slots`: a sorted set of the requests in flight, each member a slot id scored by its
//!   expiry; the key expires with its newest slot. A replica refreshes the slots it holds every
//!   [`SLOT_REFRESH`]; a slot whose replica died is not refreshed and is dropped by the next
//!   decision once its expiry (`slot_ttl`, 30 s) has passed;
//! - `:day`: a hash `{day, tokens}`, today's tokens, expiring an hour after the UTC day ends;
//! - `:recent`: a 60-slot ring of requests and tokens per second, for `/admin/clients`,
//!   expiring two minutes after the last write.
//!
//! While Redis does not answer (the [`Shared`] handle says local, or a call comes back
//! [`Unavailable`]) the decision is made by an in-process [`MemoryLimiter`] with every limit
//! divided by `REDIS_FALLBACK_REPLICAS` (rounded up, at least 1). An outage must not hand out
//! fresh limits, so each answer from Redis also tells where the client stands (its request and
//! token TATs less now, today's tokens), kept per client ([`Seen`]); before a client's first
//! local decision of an outage its local state starts from there ([`Inner::seed`]):
//!
//! - each window keeps the same time ahead of now as in Redis, so each replica has used the same
//!   part of its share as the client had of the whole limit, and frees it at its share's rate
//!   (a client that spent its minute in Redis has spent each replica's share too);
//! - the budget count is its share of today's tokens (`tokens / N`, rounded up);
//! - the requests this replica has in flight with a Redis slot count against its share of the
//!   concurrency until they end (another replica's are counted there).
//!
//! What a replica knows is what the client's last decision on that replica (or its last
//! settlement) brought back; a decision on another replica since then is not in it.
//! The daily-budget tokens charged locally (and the corrections of requests admitted by Redis
//! that ended during the outage) are kept per client and added to Redis once it answers again
//! ([`RECONCILE`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use redis::Script;
use tokio::time::Instant;

use super::limiter::{Budgets, Charge, ClientUsage, Limiter, Reason, Refusal, Standing, Window};
use super::memory::MemoryLimiter;
use crate::config::ClientLimits;
use crate::shared::{Mode, Shared, Unavailable};
use crate::vocab::price::Nanos;

/// How long a slot lives in Redis without a refresh.
pub const SLOT_TTL: Duration = Duration::from_secs(30);
/// How often a replica refreshes the slots it holds (and pushes outage charges once Redis is
/// back): a few times per `SLOT_TTL`.
pub const SLOT_REFRESH: Duration = Duration::from_secs(2);
/// A test-only knob (not a setting, not in the README's table): the slot TTL in milliseconds,
/// so that a test can watch a dead replica's slot expire without waiting half a minute.
pub const TEST_SLOT_TTL_VARIABLE: &str = "LLM_PROXY_TEST_SLOT_TTL_MS";

/// [`SLOT_TTL`], or the test knob's value.
pub fn slot_ttl() -> Duration {
    std::env::var(TEST_SLOT_TTL_VARIABLE)
        .ok()
        .and_then(|value| value.parse::<u64>().ok())
        .filter(|millis| *millis > 0)
        .map_or(SLOT_TTL, Duration::from_millis)
}

/// Counts above this are sent as this: Lua numbers are doubles, exact up to 2^53.
const MAX_COUNT: u64 = 1 << 50;

/// The Lua of the UTC calendar and of a client's dollars, as [`crate::vocab::calendar`] counts
/// them: `month_of(day)`, `next_month_start(day)`, and the nano-dollars of a day and of its
/// month kept in one hash (`usd_spent`, `set_usd_spent`), which expires an hour after its month.
macro_rules! usd_lua {
    () => {
        r"
-- Howard Hinnant's civil_from_days: year, month (1-12), day of the month of a day number.
local function civil(day)
  local z = day + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp + 3
  if mp >= 10 then m = mp - 9 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end
local function month_of(day)
  local y, m = civil(day)
  return y * 12 + m - 1
end
local function next_month_start(day)
  local y, m, d = civil(day)
  local length = 31
  if m == 2 then
    length = 28
    if y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0) then length = 29 end
  elseif m == 4 or m == 6 or m == 9 or m == 11 then
    length = 30
  end
  return day - (d - 1) + length
end

local function usd_spent(key, day)
  local stored = redis.call('HMGET', key, 'day', 'today', 'month', 'this_month')
  local today, this_month = 0, 0
  if tonumber(stored[1]) == day then today = tonumber(stored[2]) or 0 end
  if tonumber(stored[3]) == month_of(day) then this_month = tonumber(stored[4]) or 0 end
  return today, this_month
end
local function set_usd_spent(key, day, today, this_month)
  redis.call('HSET', key, 'day', day, 'today', string.format('%.0f', today),
    'month', month_of(day), 'this_month', string.format('%.0f', this_month))
  redis.call('EXPIREAT', key, next_month_start(day) * 86400 + 3600)
end
"
    };
}

/// The Lua both scripts start with: the time, today's tokens and the one-minute ring of the
/// client's keys, and `settle_from(first)`, which applies the
/// settlements in `ARGV[first..]`, seven arguments each: tokens per minute (-1 for none), tokens
/// charged, tokens used, the day charged, slot id, nano-dollars reserved, nano-dollars spent.
/// Each gives its slot back and replaces the charged tokens by the used ones and the reservation
/// by the cost (the reservation out of the day and month it went into, if they are still
/// running).
macro_rules! settle_lua {
    () => {
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = 60000000
local cap = 86400000000

-- Today's tokens of the client (KEYS[4]), and their update with the key's expiry.
local function tokens_today(day)
  local stored = redis.call('HMGET', KEYS[4], 'day', 'tokens')
  if tonumber(stored[1]) == day then return tonumber(stored[2]) or 0 end
  return 0
end
local function set_tokens_today(day, tokens)
  redis.call('HSET', KEYS[4], 'day', day, 'tokens', string.format('%.0f', tokens))
  redis.call('EXPIREAT', KEYS[4], (day + 1) * 86400 + 3600)
end

-- This second's slot of the one-minute ring (KEYS[5]), emptied when it last held another second.
local function recent_slot()
  local second = math.floor(now / 1000000)
  local i = second % 60
  if tonumber(redis.call('HGET', KEYS[5], 's' .. i)) ~= second then
    redis.call('HSET', KEYS[5], 's' .. i, second, 'r' .. i, 0, 't' .. i, 0)
  end
  return i
end

local function settle(tpm, charged, used, charged_day, slot, reserved, spent)
  redis.call('ZREM', KEYS[3], slot)
  if tpm >= 0 then
    -- A TAT that expired is in the past: the overage of a request that outlived it is
    -- charged from now, as the in-process limiter does, not lost.
    local tat = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), now)
    local period = window / tpm
    if used >= charged then
      tat = tat + math.min(period * (used - charged), cap)
    else
      -- A refund never moves the TAT before now: time already passed is not credit.
      tat = math.max(tat - period * (charged - used), now)
    end
    tat = math.ceil(tat)
    if tat > now then
      redis.call('SET', KEYS[2], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
    end
  end
  local day = math.floor(now / 86400000000)
  local today = tokens_today(day)
  if charged_day == day then today = math.max(today - charged, 0) end
  set_tokens_today(day, today + used)
  local i = recent_slot()
  redis.call('HINCRBY', KEYS[5], 't' .. i, used - charged)
  redis.call('PEXPIRE', KEYS[5], 120000)
  if reserved > 0 or spent > 0 then
    local usd_today, usd_month = usd_spent(KEYS[6], day)
    if charged_day == day then usd_today = math.max(usd_today - reserved, 0) end
    if month_of(charged_day) == month_of(day) then usd_month = math.max(usd_month - reserved, 0) end
    set_usd_spent(KEYS[6], day, usd_today + spent, usd_month + spent)
  end
end

local function settle_from(first)
  for i = first, #ARGV - 6, 7 do
    settle(tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), ARGV[i + 4],
      tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6]))
  end
end
"
    };
}

/// KEYS: 1 request TAT, 2 token TAT, 3 slots, 4 day, 5 recent, 6 dollars.
/// ARGV: 1 requests per minute, 2 tokens per minute, 3 max concurrent, 4 tokens per day (each
/// -1 for none), 5 estimate, 6 slot id, 7 slot TTL in µs, 8 nano-dollars per day, 9 per month
/// (each -1 for none), 10 the reservation in nano-dollars, then the client's settlements waiting
/// (see `settle_lua`), applied first.
/// Returns {admitted (1/0), reason (1 requests, 2 tokens, 3 concurrency, 4 budget, 5 dollars of
/// the day, 6 dollars of the month), retry after µs, day, request remaining, request reset µs,
/// token remaining, token reset µs, tokens today, nano-dollars today, nano-dollars this month}.
pub const ACQUIRE: &str = concat!(
    usd_lua!(),
    settle_lua!(),
    r"
settle_from(11)
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local maxc, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local estimate, ttl = tonumber(ARGV[5]), tonumber(ARGV[7])
local usd_per_day, usd_per_month, reservation = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])

local function gcra(key, limit, cost)
  local tat = tonumber(redis.call('GET', key) or '0')
  local base = math.max(tat, now)
  local new_tat = math.ceil(base + math.min(window / limit * cost, cap))
  if new_tat <= now + window or (cost > limit and base == now) then
    return tat, new_tat, 0
  elseif cost > limit then
    return tat, nil, base - now
  else
    return tat, nil, new_tat - (now + window)
  end
end

local function standing(tat, limit)
  if limit < 0 then return -1, 0 end
  local used = math.max(tat - now, 0)
  local free = math.max(window - used, 0)
  return math.floor(free / (window / limit)), used
end

local reason, wait = 0, -1
local function refuse(code, w)
  if w > wait then reason, wait = code, w end
end

redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if maxc >= 0 and redis.call('ZCARD', KEYS[3]) >= maxc then refuse(3, 1000000) end

local rtat, new_rtat, tat_wait = 0, nil, 0
if rpm >= 0 then
  rtat, new_rtat, tat_wait = gcra(KEYS[1], rpm, 1)
  if not new_rtat then refuse(1, tat_wait) end
end
local ttat, new_ttat = 0, nil
if tpm >= 0 then
  ttat, new_ttat, tat_wait = gcra(KEYS[2], tpm, estimate)
  if not new_ttat then refuse(2, tat_wait) end
end

local day = math.floor(now / 86400000000)
local today = tokens_today(day)
if budget >= 0 and today + estimate > budget then refuse(4, (day + 1) * 86400000000 - now) end

-- Spent and reserved so far, with this reservation, within each dollar budget.
local usd_today, usd_month = 0, 0
if usd_per_day >= 0 or usd_per_month >= 0 or reservation > 0 then
  usd_today, usd_month = usd_spent(KEYS[6], day)
end
if usd_per_day >= 0 and usd_today + reservation > usd_per_day then
  refuse(5, (day + 1) * 86400000000 - now)
end
if usd_per_month >= 0 and usd_month + reservation > usd_per_month then
  -- On a month's last day both budgets wait as long: the month is named, as the in-process
  -- limiter names it (the budget that refuses however the day is spent).
  local w = next_month_start(day) * 86400000000 - now
  if w >= wait then reason, wait = 6, w end
end

if wait >= 0 then
  local rr, rs = standing(rtat, rpm)
  local tr, ts = standing(ttat, tpm)
  return {0, reason, wait, day, rr, rs, tr, ts, string.format('%.0f', today),
    string.format('%.0f', usd_today), string.format('%.0f', usd_month)}
end

if new_rtat then
  redis.call('SET', KEYS[1], string.format('%.0f', new_rtat), 'PX', math.ceil((new_rtat - now) / 1000) + 1000)
  rtat = new_rtat
end
if new_ttat then
  redis.call('SET', KEYS[2], string.format('%.0f', new_ttat), 'PX', math.ceil((new_ttat - now) / 1000) + 1000)
  ttat = new_ttat
end
redis.call('ZADD', KEYS[3], string.format('%.0f', now + ttl), ARGV[6])
redis.call('PEXPIRE', KEYS[3], math.ceil(ttl / 1000))
set_tokens_today(day, today + estimate)
local i = recent_slot()
redis.call('HINCRBY', KEYS[5], 'r' .. i, 1)
redis.call('HINCRBY', KEYS[5], 't' .. i, estimate)
redis.call('PEXPIRE', KEYS[5], 120000)
if reservation > 0 then
  usd_today, usd_month = usd_today + reservation, usd_month + reservation
  set_usd_spent(KEYS[6], day, usd_today, usd_month)
end
local rr, rs = standing(rtat, rpm)
local tr, ts = standing(ttat, tpm)
return {1, 0, 0, day, rr, rs, tr, ts, string.format('%.0f', today + estimate),
  string.format('%.0f', usd_today), string.format('%.0f', usd_month)}
"
);

/// KEYS: as [`ACQUIRE`]'s. ARGV: settlements (see `settle_lua`). Returns {day, tokens today,
/// token TAT less now in µs (0 when in the past), nano-dollars today, this month}: the
/// settlements moved them.
pub const SETTLE: &str = concat!(
    usd_lua!(),
    settle_lua!(),
    r"
settle_from(1)
local day = math.floor(now / 86400000000)
local ttat = tonumber(redis.call('GET', KEYS[2]) or '0')
local usd_today, usd_month = usd_spent(KEYS[6], day)
return {day, string.format('%.0f', tokens_today(day)), math.max(ttat - now, 0),
  string.format('%.0f', usd_today), string.format('%.0f', usd_month)}
"
);

/// How long a settlement waits for its client's next decision to carry it to Redis: long
/// enough for a busy client's next request, short enough that a place given back is free again
/// at once by any human or client measure.
pub const SETTLE_DELAY: Duration = Duration::from_millis(5);

/// KEYS: 1 slots. ARGV: 1 slot TTL in µs, then the slot ids this replica holds. Pushes their
/// expiry on (only those still there: `XX`), and the key's with them.
pub const REFRESH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[1])
local score = string.format('%.0f', now + ttl)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', score, ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000))
end
return 1
";

/// KEYS: 1 day, 2 dollars. ARGV: 1 the day, 2 tokens to add, 3 nano-dollars to add (either may
/// be negative). Adds what was charged on that day while Redis did not answer: the tokens to the
/// day's count if that day is still today, the dollars to the day's if it is today and to the
/// month's if it is still this month.
pub const RECONCILE: &str = concat!(
    usd_lua!(),
    r"
local t = redis.call('TIME')
local day = math.floor(tonumber(t[1]) / 86400)
local charged_day, tokens, nanos = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if charged_day == day and tokens ~= 0 then
  local stored = redis.call('HMGET', KEYS[1], 'day', 'tokens')
  local today = 0
  if tonumber(stored[1]) == day then today = tonumber(stored[2]) or 0 end
  today = math.max(today + tokens, 0)
  redis.call('HSET', KEYS[1], 'day', day, 'tokens', string.format('%.0f', today))
  redis.call('EXPIREAT', KEYS[1], (day + 1) * 86400 + 3600)
end
if nanos ~= 0 and month_of(charged_day) == month_of(day) then
  local usd_today, usd_month = usd_spent(KEYS[2], day)
  if charged_day == day then usd_today = math.max(usd_today + nanos, 0) end
  set_usd_spent(KEYS[2], day, usd_today, math.max(usd_month + nanos, 0))
end
return 1
"
);

/// KEYS: 1 slots, 2 day, 3 recent, 4 dollars. Returns {in flight, tokens today, requests and
/// tokens in the last minute, nano-dollars today, this month}.
pub const USAGE: &str = concat!(
    usd_lua!(),
    r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local second = tonumber(t[1])
local in_flight = redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.0f', now), '+inf')
local stored = redis.call('HMGET', KEYS[2], 'day', 'tokens')
local today = 0
if tonumber(stored[1]) == math.floor(second / 86400) then today = tonumber(stored[2]) or 0 end
local requests, tokens = 0, 0
for i = 0, 59 do
  local at = tonumber(redis.call('HGET', KEYS[3], 's' .. i))
  if at and at + 60 > second and at <= second then
    requests = requests + (tonumber(redis.call('HGET', KEYS[3], 'r' .. i)) or 0)
    tokens = tokens + (tonumber(redis.call('HGET', KEYS[3], 't' .. i)) or 0)
  end
end
local usd_today, usd_month = usd_spent(KEYS[4], math.floor(second / 86400))
return {in_flight, string.format('%.0f', today), requests, math.max(tokens, 0),
  string.format('%.0f', usd_today), string.format('%.0f', usd_month)}
"
);

/// The names of one client's keys.
struct Keys {
    rpm: String,
    tpm: String,
    slots: String,
    day: String,
    recent: String,
    usd: String,
}

/// `llm-proxy:{client:<name>}:<what>`. Braces in a client's name would end the hash tag early;
/// a name is letters, digits, `_`, `.` and `-` (the clients file's rule), so this is belt and
/// braces.
fn keys(client: &str) -> Keys {
    let tag: String = client
        .chars()
        .map(|c| if matches!(c, '{' | '}') { '_' } else { c })
        .collect();
    let key = |what: &str| format!("llm-proxy:{{client:{tag}}}:{what}");
    Keys {
        rpm: key("rpm"),
        tpm: key("tpm"),
        slots: key("slots"),
        day: key("day"),
        recent: key("recent"),
        usd: key("usd"),
    }
}

/// The Redis backend. Cloning is shallow.
#[derive(Clone)]
pub struct RedisLimiter(Arc<Inner>);

struct Inner {
    shared: Shared,
    /// The decisions made while Redis does not answer, with divided limits.
    local: MemoryLimiter,
    acquire: Script,
    settle: Script,
    refresh: Script,
    reconcile: Script,
    usage: Script,
    /// This process's part of every slot id: slots of different replicas never collide.
    replica: String,
    next_slot: AtomicU64,
    slot_ttl: Duration,
    // Synchronous locks: held for a map operation, never across an `.await`.
    /// The slots this replica holds in Redis, by slot number, with their client.
    held: Mutex<HashMap<u64, Arc<str>>>,
    /// Per client and day, the budget tokens and nano-dollars charged outside Redis, to be added
    /// to it.
    outage: Mutex<HashMap<(String, u64), (i64, i64)>>,
    /// Per client with a per-minute limit or a budget, where it stood when Redis last answered
    /// for it: a replica going local starts from its share of that, not from zero.
    known: Mutex<HashMap<Arc<str>, Seen>>,
    /// The clients whose local state was set from `known` in this outage.
    seeded: Mutex<HashSet<Arc<str>>>,
    /// The slots of `held` the local limiter counts as in flight (seeded into it): each is
    /// given back there too when its request ends, or the local count would never come down.
    counted: Mutex<HashSet<u64>>,
    /// Per client, the settlements waiting for its next decision (or for [`SETTLE_DELAY`]).
    waiting: Mutex<HashMap<Arc<str>, Vec<Settlement>>>,
    /// Whether a task will send what is still waiting once [`SETTLE_DELAY`] has passed.
    flush_planned: AtomicBool,
}

/// A client's standing as Redis last told it.
#[derive(Clone, Copy, Debug)]
struct Seen {
    /// When the answer came, on this process's clock: the TATs below are from Redis's now,
    /// which was earlier, so counting them from here errs on the safe side.
    at: Instant,
    /// How far the request and token TATs were ahead of Redis's now (zero when in the past).
    requests: Duration,
    tokens: Duration,
    /// The UTC day and the client's tokens and nano-dollars of it, and nano-dollars of its month.
    day: u64,
    tokens_today: u64,
    usd_today: Nanos,
    usd_month: Nanos,
}

/// A request's end, as the settlement scripts take it.
#[derive(Clone, Copy, Debug)]
struct Settlement {
    tpm: Option<u64>,
    charge: Charge,
    used: u64,
    spent: Nanos,
}

/// `limit` divided by the replica count, rounded up, at least 1.
fn divided(limit: Option<u64>, replicas: u64) -> Option<u64> {
    limit.map(|limit| limit.div_ceil(replicas.max(1)).max(1))
}

/// A limit for a script: -1 for none, and never 0 (a period of 60 s / 0 would be infinite; the
/// in-process limiter takes 0 as 1 the same way).
fn limit_arg(limit: Option<u64>) -> i64 {
    limit.map_or(-1, |limit| {
        i64::try_from(limit.clamp(1, MAX_COUNT)).unwrap_or(i64::MAX)
    })
}

fn count_arg(count: u64) -> u64 {
    count.min(MAX_COUNT)
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

fn signed(count: u64) -> i64 {
    i64::try_from(count.min(MAX_COUNT)).unwrap_or(i64::MAX)
}

impl RedisLimiter {
    /// Starts the refresh task (so this needs a tokio runtime); it ends when the limiter is
    /// dropped. `slot_ttl` is [`SLOT_TTL`] outside tests.
    pub fn new(shared: Shared, slot_ttl: Duration) -> RedisLimiter {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let limiter = RedisLimiter(Arc::new(Inner {
            shared,
            local: MemoryLimiter::new(),
            acquire: Script::new(ACQUIRE),
            settle: Script::new(SETTLE),
            refresh: Script::new(REFRESH),
            reconcile: Script::new(RECONCILE),
            usage: Script::new(USAGE),
            replica: format!("{:x}-{started:x}", std::process::id()),
            next_slot: AtomicU64::new(1),
            slot_ttl,
            held: Mutex::new(HashMap::new()),
            outage: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
            seeded: Mutex::new(HashSet::new()),
            counted: Mutex::new(HashSet::new()),
            waiting: Mutex::new(HashMap::new()),
            flush_planned: AtomicBool::new(false),
        }));
        let refresh = (slot_ttl / 3).clamp(Duration::from_millis(100), SLOT_REFRESH);
        tokio::spawn(refresh_loop(Arc::downgrade(&limiter.0), refresh));
        limiter
    }
}

impl Inner {
    fn slot_id(&self, slot: u64) -> String {
        format!("{}:{slot}", self.replica)
    }

    /// The limits a replica enforces alone while Redis does not answer.
    fn local_limits(&self, limits: &ClientLimits) -> ClientLimits {
        let replicas = u64::from(self.shared.fallback_replicas());
        ClientLimits {
            requests_per_minute: divided(limits.requests_per_minute, replicas),
            tokens_per_minute: divided(limits.tokens_per_minute, replicas),
            max_concurrent_requests: divided(limits.max_concurrent_requests, replicas),
            tokens_per_day: divided(limits.tokens_per_day, replicas),
            usd_per_day: divided(limits.usd_per_day, replicas),
            usd_per_month: divided(limits.usd_per_month, replicas),
            ..ClientLimits::default()
        }
    }

    fn remember(&self, client: &str, seen: Seen) {
        let mut known = self.known.lock();
        // A lookup first: the name is allocated only for a client's first request.
        if let Some(entry) = known.get_mut(client) {
            *entry = seen;
        } else {
            known.insert(Arc::from(client), seen);
        }
    }

    /// Before a client's first local decision of an outage: its local state starts from its
    /// share of where Redis last said it stood (see the module doc), so that the replicas
    /// together stay within each limit across the switch.
    fn seed(&self, client: &str, limits: &ClientLimits) {
        if self.seeded.lock().contains(client) {
            return;
        }
        let seen = self.known.lock().get(client).copied();
        // The windows keep their time ahead of now (less the time since Redis said it): a
        // window is a fraction of the minute used, the same for a share as for the whole.
        let (requests, tokens) = seen.map_or((Duration::ZERO, Duration::ZERO), |seen| {
            let gone = seen.at.elapsed();
            (
                seen.requests.saturating_sub(gone),
                seen.tokens.saturating_sub(gone),
            )
        });
        let in_flight = if limits.max_concurrent_requests.is_some() {
            // Under the `held` lock: a slot that ends meanwhile is either not counted yet or
            // counted and given back (see `release`), never counted after it ended.
            let held = self.held.lock();
            let mut counted = self.counted.lock();
            let mine = held.iter().filter(|(_, owner)| ***owner == *client);
            mine.filter(|(slot, _)| counted.insert(**slot)).count() as u64
        } else {
            0
        };
        if in_flight > 0 || !requests.is_zero() || !tokens.is_zero() {
            self.local.seed(client, requests, tokens, in_flight);
        }
        if let Some(seen) = seen {
            self.seed_budget(client, limits, &seen);
        }
        self.seeded.lock().insert(Arc::from(client));
    }

    /// The local budget counts become the client's share of what Redis last counted, so that
    /// the replicas together spend at most what was left of each budget (each has
    /// `tokens_per_day / N` less `today / N`, and the same for the dollars of the day and of the
    /// month).
    fn seed_budget(&self, client: &str, limits: &ClientLimits, seen: &Seen) {
        let replicas = u64::from(self.shared.fallback_replicas()).max(1);
        let local = self
            .local
            .budgets()
            .filter(|budgets| budgets.day == seen.day)
            .unwrap_or_default();
        // Never below what this replica already counted locally: a seed from a stale Redis
        // count must not erase local spending (a Redis that answers PING but refuses scripts
        // sends every decision here while the mode stays shared).
        let share = |count: u64, counted: &[(String, u64)]| {
            let counted = counted
                .iter()
                .find(|(name, _)| name == client)
                .map_or(0, |(_, count)| *count);
            vec![(client.to_string(), count.div_ceil(replicas).max(counted))]
        };
        let mut budgets = Budgets {
            day: seen.day,
            ..Budgets::default()
        };
        if limits.tokens_per_day.is_some() {
            budgets.tokens = share(seen.tokens_today, &local.tokens);
        }
        if limits.usd_per_day.is_some() {
            budgets.usd_today = share(seen.usd_today, &local.usd_today);
        }
        if limits.usd_per_month.is_some() {
            budgets.usd_month = share(seen.usd_month, &local.usd_month);
        }
        self.local.restore_budgets(budgets);
    }

    /// A slot is no longer this replica's to refresh (its request ended, or it was never
    /// owned); if the local limiter counts it as in flight, its place is given back there too.
    fn release(&self, client: &str, slot: u64) {
        let counted = {
            let mut held = self.held.lock();
            held.remove(&slot);
            self.counted.lock().remove(&slot)
        };
        if counted {
            // No tokens: only the place (the tokens are settled with Redis, or reconciled).
            let place = Charge {
                tokens: 0,
                nanos: 0,
                day: 0,
                slot: 0,
            };
            self.local
                .settle(client, &ClientLimits::default(), place, 0, 0);
        }
    }

    /// Kept by the day they were charged to: the reconciliation adds an earlier day's tokens to
    /// nothing (that day's budget is over) but its dollars to the month, if it is still running.
    fn record_outage(&self, client: &str, day: u64, tokens: i64, nanos: i64) {
        if tokens == 0 && nanos == 0 {
            return;
        }
        let mut outage = self.outage.lock();
        let entry = outage.entry((client.to_string(), day)).or_insert((0, 0));
        entry.0 = entry.0.saturating_add(tokens);
        entry.1 = entry.1.saturating_add(nanos);
    }

    async fn acquire_shared(
        &self,
        client: &str,
        limits: &ClientLimits,
        estimate: u64,
        reservation: Nanos,
    ) -> Result<Result<(Charge, Standing), Refusal>, Unavailable> {
        let keys = keys(client);
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
        let mut invocation = self.acquire.prepare_invoke();
        invocation
            .key(&keys.rpm)
            .key(&keys.tpm)
            .key(&keys.slots)
            .key(&keys.day)
            .key(&keys.recent)
            .key(&keys.usd)
            .arg(limit_arg(limits.requests_per_minute))
            .arg(limit_arg(limits.tokens_per_minute))
            .arg(limit_arg(limits.max_concurrent_requests))
            .arg(limit_arg(limits.tokens_per_day))
            .arg(count_arg(estimate))
            .arg(self.slot_id(slot))
            .arg(micros(self.slot_ttl))
            .arg(limit_arg(limits.usd_per_day))
            .arg(limit_arg(limits.usd_per_month))
            .arg(count_arg(reservation));
        let carried = self.waiting.lock().remove(client).unwrap_or_default();
        for settlement in &carried {
            self.push_settlement(&mut invocation, settlement);
        }
        // Held before the answer: a refresh that runs meanwhile only pushes on a slot that is
        // there (`XX`), and the slot must not wait a whole period for its first refresh.
        self.held.lock().insert(slot, Arc::from(client));
        // Until a ticket owns the slot, it is given up however this ends, a caller that left
        // mid-call (the future dropped) included: a slot held here but owned by nobody would be
        // refreshed for the life of the process and lock the client out.
        let mut unowned = UnownedSlot {
            inner: self,
            client,
            slot,
            owned: false,
        };
        let answer: Result<Vec<i64>, Unavailable> = self.shared.eval(&invocation).await;
        let answer = match answer {
            Ok(answer) if answer.len() == 11 => answer,
            // Not in Redis, or perhaps in it after all (a timeout is "no answer", not "not
            // applied"): either way the slot is no longer refreshed and expires by itself, and
            // the settlements carried wait with the outage charges, as one sent alone would.
            Ok(_) | Err(_) => {
                self.settlements_lost(client, &carried);
                return Err(Unavailable);
            }
        };
        let unsigned = |value: i64| u64::try_from(value).unwrap_or(0);
        // What a switch to local mode would start from (see `seed`); a client without a
        // per-minute limit or a budget has nothing to carry over.
        if limits.requests_per_minute.is_some()
            || limits.tokens_per_minute.is_some()
            || limits.tokens_per_day.is_some()
            || limits.has_dollar_budget()
        {
            self.remember(
                client,
                Seen {
                    at: Instant::now(),
                    requests: Duration::from_micros(unsigned(answer[5])),
                    tokens: Duration::from_micros(unsigned(answer[7])),
                    day: unsigned(answer[3]),
                    tokens_today: unsigned(answer[8]),
                    usd_today: unsigned(answer[9]),
                    usd_month: unsigned(answer[10]),
                },
            );
        }
        let window = |limit: Option<u64>, remaining: i64, reset: i64| {
            limit.map(|limit| Window {
                limit,
                remaining: unsigned(remaining),
                reset: Duration::from_micros(unsigned(reset)),
            })
        };
        let standing = Standing {
            requests: window(limits.requests_per_minute, answer[4], answer[5]),
            tokens: window(limits.tokens_per_minute, answer[6], answer[7]),
        };
        if answer[0] == 1 {
            unowned.owned = true;
            return Ok(Ok((
                Charge {
                    tokens: estimate,
                    nanos: reservation,
                    day: unsigned(answer[3]),
                    slot,
                },
                standing,
            )));
        }
        let reason = match answer[1] {
            1 => Reason::Requests,
            2 => Reason::Tokens,
            3 => Reason::Concurrency,
            5 => Reason::UsdPerDay,
            6 => Reason::UsdPerMonth,
            _ => Reason::Budget,
        };
        Ok(Err(Refusal {
            reason,
            retry_after: Duration::from_micros(unsigned(answer[2])),
            standing,
        }))
    }

    fn push_settlement(
        &self,
        invocation: &mut redis::ScriptInvocation<'_>,
        settlement: &Settlement,
    ) {
        invocation
            .arg(limit_arg(settlement.tpm))
            .arg(count_arg(settlement.charge.tokens))
            .arg(count_arg(settlement.used))
            .arg(settlement.charge.day)
            .arg(self.slot_id(settlement.charge.slot))
            .arg(count_arg(settlement.charge.nanos))
            .arg(count_arg(settlement.spent));
    }

    /// Settlements that did not reach Redis: their places expire by themselves; their token
    /// and dollar corrections are added once Redis answers again.
    fn settlements_lost(&self, client: &str, settlements: &[Settlement]) {
        for settlement in settlements {
            self.record_outage(
                client,
                settlement.charge.day,
                signed(settlement.used).saturating_sub(signed(settlement.charge.tokens)),
                signed(settlement.spent).saturating_sub(signed(settlement.charge.nanos)),
            );
        }
    }

    /// Queues a settlement for the client's next decision, and makes sure it is sent within
    /// [`SETTLE_DELAY`] if no decision comes.
    fn settle_later(self: &Arc<Self>, client: &str, settlement: Settlement) {
        {
            let mut waiting = self.waiting.lock();
            match waiting.get_mut(client) {
                Some(queue) => queue.push(settlement),
                None => {
                    waiting.insert(Arc::from(client), vec![settlement]);
                }
            }
        }
        if !self.flush_planned.swap(true, Ordering::AcqRel) {
            let inner = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(SETTLE_DELAY).await;
                inner.flush().await;
            });
        }
    }

    /// Sends every settlement still waiting: one script call per client.
    async fn flush(&self) {
        // Cleared first: a settlement queued after the queues are taken plans its own flush.
        self.flush_planned.store(false, Ordering::Release);
        let waiting: Vec<(Arc<str>, Vec<Settlement>)> = self.waiting.lock().drain().collect();
        for (client, settlements) in waiting {
            let keys = keys(&client);
            let mut invocation = self.settle.prepare_invoke();
            invocation
                .key(&keys.rpm)
                .key(&keys.tpm)
                .key(&keys.slots)
                .key(&keys.day)
                .key(&keys.recent)
                .key(&keys.usd);
            for settlement in &settlements {
                self.push_settlement(&mut invocation, settlement);
            }
            let answer: Result<(u64, u64, u64, u64, u64), Unavailable> =
                self.shared.eval(&invocation).await;
            match answer {
                Ok((day, today, tokens_ahead, usd_today, usd_month)) => {
                    // Only the clients acquire remembers; the request window did not move.
                    if let Some(seen) = self.known.lock().get_mut(&client) {
                        let at = Instant::now();
                        let requests = seen.requests.saturating_sub(at - seen.at);
                        *seen = Seen {
                            at,
                            requests,
                            tokens: Duration::from_micros(tokens_ahead),
                            day,
                            tokens_today: today,
                            usd_today,
                            usd_month,
                        };
                    }
                }
                Err(Unavailable) => self.settlements_lost(&client, &settlements),
            }
        }
    }

    /// Refreshes every held slot (one script per client) and, with Redis answering, adds the
    /// outage charges to it.
    async fn tick(&self) {
        if self.shared.mode() != Mode::Shared {
            return;
        }
        // The next outage starts again from what Redis will have counted by then.
        self.seeded.lock().clear();
        let pending: Vec<((String, u64), (i64, i64))> = self.outage.lock().drain().collect();
        for ((client, day), (tokens, nanos)) in pending {
            let keys = keys(&client);
            let mut invocation = self.reconcile.prepare_invoke();
            invocation
                .key(keys.day)
                .key(keys.usd)
                .arg(day)
                .arg(tokens)
                .arg(nanos);
            if self.shared.eval::<i64>(&invocation).await.is_err() {
                self.record_outage(&client, day, tokens, nanos);
            } else {
                log::info!(
                    "budgets of client {client}: {tokens} tokens and {} USD charged while Redis \
                     did not answer were added to them",
                    crate::vocab::price::format_signed_usd(nanos)
                );
            }
        }
        let mut by_client: HashMap<Arc<str>, Vec<u64>> = HashMap::new();
        for (slot, client) in self.held.lock().iter() {
            by_client.entry(client.clone()).or_default().push(*slot);
        }
        for (client, slots) in by_client {
            let mut invocation = self.refresh.prepare_invoke();
            invocation
                .key(keys(&client).slots)
                .arg(micros(self.slot_ttl));
            for slot in slots {
                invocation.arg(self.slot_id(slot));
            }
            // A failure is the handle's to log and act on; the slot's expiry is the safety net.
            let _ = self.shared.eval::<i64>(&invocation).await;
        }
    }
}

async fn refresh_loop(inner: Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        strong.tick().await;
    }
}

impl Limiter for RedisLimiter {
    fn acquire<'a>(
        &'a self,
        client: &'a str,
        limits: &'a ClientLimits,
        estimate: u64,
        reservation: Nanos,
    ) -> BoxFuture<'a, Result<(Charge, Standing), Refusal>> {
        Box::pin(async move {
            if let Ok(decided) = self
                .0
                .acquire_shared(client, limits, estimate, reservation)
                .await
            {
                return decided;
            }
            // Redis does not answer: this replica decides alone, with its share of each limit.
            let local = self.0.local_limits(limits);
            self.0.seed(client, limits);
            let decided = self
                .0
                .local
                .acquire(client, &local, estimate, reservation)
                .await;
            if let Ok((charge, _)) = &decided {
                self.0.record_outage(
                    client,
                    charge.day,
                    signed(charge.tokens),
                    signed(charge.nanos),
                );
            }
            decided
        })
    }

    fn settle(&self, client: &str, limits: &ClientLimits, charge: Charge, used: u64, spent: Nanos) {
        if charge.slot == 0 {
            // Decided locally: settled locally, and the correction joins the outage charges.
            self.0
                .local
                .settle(client, &self.0.local_limits(limits), charge, used, spent);
            self.0.record_outage(
                client,
                charge.day,
                signed(used).saturating_sub(signed(charge.tokens)),
                signed(spent).saturating_sub(signed(charge.nanos)),
            );
            return;
        }
        // No longer refreshed from now on: if the settlement does not arrive, the slot expires.
        self.0.release(client, charge.slot);
        let settlement = Settlement {
            tpm: limits.tokens_per_minute,
            charge,
            used,
            spent,
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            self.0.settle_later(client, settlement);
        } else {
            // No runtime to send it from (shutdown): the correction waits with the outage
            // charges.
            self.0.settlements_lost(client, &[settlement]);
        }
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.0.flush())
    }

    fn usage<'a>(&'a self, client: &'a str) -> BoxFuture<'a, ClientUsage> {
        Box::pin(async move {
            let keys = keys(client);
            let mut invocation = self.0.usage.prepare_invoke();
            invocation
                .key(&keys.slots)
                .key(&keys.day)
                .key(&keys.recent)
                .key(&keys.usd);
            let answer: Result<Vec<u64>, Unavailable> = self.0.shared.eval(&invocation).await;
            match answer {
                Ok(answer) if answer.len() == 6 => ClientUsage {
                    in_flight: answer[0],
                    tokens_today: answer[1],
                    requests_last_minute: answer[2],
                    tokens_last_minute: answer[3],
                    usd_today: answer[4],
                    usd_this_month: answer[5],
                },
                // What this replica counted alone (the outage charges are part of it).
                _ => self.0.local.usage(client).await,
            }
        })
    }
}

/// A slot this replica refreshes but no ticket owns yet; dropped unowned, it stops refreshing.
struct UnownedSlot<'a> {
    inner: &'a Inner,
    client: &'a str,
    slot: u64,
    owned: bool,
}

impl Drop for UnownedSlot<'_> {
    fn drop(&mut self) {
        if !self.owned {
            self.inner.release(self.client, self.slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_client_carries_its_hash_tag() {
        let keys = keys("alice");
        for name in [
            keys.rpm,
            keys.tpm,
            keys.slots,
            keys.day,
            keys.recent,
            keys.usd,
        ] {
            assert!(name.starts_with("llm-proxy:{client:alice}:"), "{name}");
        }
        assert_eq!(super::keys("a{b}").day, "llm-proxy:{client:a_b_}:day");
    }

    #[test]
    fn fallback_limits_are_divided_rounding_up_and_never_zero() {
        assert_eq!(divided(Some(5), 2), Some(3));
        assert_eq!(divided(Some(1), 2), Some(1));
        assert_eq!(divided(Some(10), 1), Some(10));
        assert_eq!(divided(None, 2), None);
        assert_eq!(limit_arg(None), -1);
        assert_eq!(limit_arg(Some(0)), 1, "never a period of 60 s / 0");
        assert_eq!(limit_arg(Some(u64::MAX)), 1 << 50);
    }
}
