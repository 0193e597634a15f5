// The status page: reads /admin/clients, /admin/upstreams, /admin/spend and /admin/activity with the admin
// token as a Bearer value in DEFAULT_AUTH_HEADER, every five seconds while the tab is visible.
// The token lives in sessionStorage only: never in the page, a URL, a cookie or the console.
// Every text goes in with textContent, so no name from the clients file can become markup.

const TOKEN_KEY = 'llm-proxy-admin-token';
// DEFAULT_AUTH_HEADER, which the proxy writes into the page.
const AUTH_HEADER = document.querySelector('meta[name="auth-header"]').content || 'authorization';
const REFRESH_MS = 5000;

const $ = (id) => document.getElementById(id);
const form = $('token-form');
const input = $('token');
const forget = $('forget');
const message = $('message');
const main = $('status');
const filter = $('filter');

let timer = null;
let refreshes = 0;
let clients = [];
let sort = { key: 'name', dir: 1 };

class HttpError extends Error {
  constructor(status, code, text) {
    super(text);
    this.status = status;
    this.code = code;
  }
}

const token = () => sessionStorage.getItem(TOKEN_KEY);

async function get(path) {
  const response = await fetch(path, {
    headers: { [AUTH_HEADER]: `Bearer ${token()}` },
    cache: 'no-store',
    credentials: 'omit',
    referrerPolicy: 'no-referrer',
  });
  if (!response.ok) {
    let code = '';
    let text = response.statusText;
    try {
      const body = await response.json();
      code = body.error || '';
      text = body.message || text;
    } catch {
      // Not JSON: the status says enough.
    }
    throw new HttpError(response.status, code, text);
  }
  return response.json();
}

// A proxy without the route answers 404: the page then leaves its section out, not the rest.
async function optional(path) {
  try {
    return await get(path);
  } catch (err) {
    if (err instanceof HttpError && err.status === 404) {
      return null;
    }
    throw err;
  }
}

function say(text) {
  message.textContent = text;
  message.hidden = !text;
}

function showForm(withToken) {
  form.hidden = withToken;
  forget.hidden = !withToken;
  if (!withToken) {
    main.hidden = true;
  }
}

function schedule() {
  clearTimeout(timer);
  timer = null;
  if (token() && document.visibilityState === 'visible') {
    timer = setTimeout(refresh, REFRESH_MS);
  }
}

async function refresh() {
  clearTimeout(timer);
  timer = null;
  if (!token()) {
    showForm(false);
    return;
  }
  try {
    const [clientList, upstreamList, activity, byModel, byUpstream] = await Promise.all([
      get('clients'),
      get('upstreams'),
      get('activity'),
      optional('spend?by=model'),
      optional('spend?by=upstream'),
    ]);
    clients = clientList.clients || [];
    renderClients();
    renderUpstreams(upstreamList.upstreams || []);
    renderActivity(activity);
    renderSpend(byModel, byUpstream);
    const now = new Date();
    $('updated').textContent = now.toLocaleTimeString();
    $('updated').title = now.toISOString();
    say('');
    showForm(true);
    main.hidden = false;
    refreshes += 1;
    main.dataset.refreshes = String(refreshes);
  } catch (err) {
    if (err instanceof HttpError && err.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showForm(false);
      say(`The admin token was refused (401 ${err.code}): ${err.message} Enter the proxy's ADMIN_TOKEN.`);
      return;
    }
    say(`Could not refresh: ${err instanceof HttpError ? `${err.status} ${err.message}` : 'the proxy did not answer'}. Trying again.`);
  }
  schedule();
}

// ---- formatting ----

const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });

// Below a dollar, to the micro-dollar the proxy counts in; cents above.
function usd(value) {
  const digits = value !== 0 && Math.abs(value) < 1 ? 6 : 2;
  return `$${value.toLocaleString(undefined, { minimumFractionDigits: 2, maximumFractionDigits: digits })}`;
}

function relative(iso) {
  const at = new Date(iso);
  const seconds = Math.round((at.getTime() - Date.now()) / 1000);
  const size = Math.abs(seconds);
  let text;
  if (size < 90) {
    text = `${size} s`;
  } else if (size < 90 * 60) {
    text = `${Math.round(size / 60)} min`;
  } else {
    text = `${Math.round(size / 3600)} h`;
  }
  return seconds >= 0 ? `in ${text}` : `${text} ago`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

function time(iso) {
  const node = el('time', '', relative(iso));
  node.dateTime = iso;
  node.title = new Date(iso).toLocaleString(undefined, { timeZoneName: 'short' });
  return node;
}

// `used` against `limit`, in `unit`; marked when near or over the limit.
function measure(used, limit, format, unit) {
  const cell = el('td', 'num');
  if (used === undefined || used === null) {
    cell.append(el('span', 'muted', '—'));
    return cell;
  }
  const value = el('span', '', `${format(used)}${unit}`);
  if (limit) {
    if (used >= limit) {
      value.className = 'over';
    } else if (used >= 0.8 * limit) {
      value.className = 'near';
    }
  }
  cell.append(value);
  if (limit !== undefined && limit !== null) {
    cell.append(el('span', 'of', ` of ${format(limit)}${unit}`));
  }
  return cell;
}

// ---- clients ----

const SORT_VALUES = {
  name: (c) => c.name,
  state: (c) => c.state || '',
  requests: (c) => c.usage.requests_last_minute,
  tokens: (c) => c.usage.tokens_last_minute,
  today: (c) => c.usage.tokens_today,
  usd_today: (c) => c.usage.usd_today ?? -1,
  usd_month: (c) => c.usage.usd_this_month ?? -1,
  in_flight: (c) => c.usage.in_flight,
  refusals: (c) => Object.values(c.usage.refusals_last_hour || {}).reduce((a, b) => a + b, 0),
};

function matches(client, words) {
  if (!words) {
    return true;
  }
  const haystack = [client.name, client.state || '', ...Object.keys(client.usage.refusals_last_hour || {})]
    .join(' ')
    .toLowerCase();
  return words.split(/\s+/).every((word) => haystack.includes(word));
}

function renderClients() {
  // Dollar columns appear once the proxy reports dollars.
  const dollars = clients.some((c) => c.usage.usd_today !== undefined || c.usage.usd_this_month !== undefined);
  for (const key of ['usd_today', 'usd_month']) {
    document.querySelector(`#clients th[data-key="${key}"]`).hidden = !dollars;
  }
  for (const th of document.querySelectorAll('#clients th')) {
    if (th.dataset.key === sort.key) {
      th.setAttribute('aria-sort', sort.dir > 0 ? 'ascending' : 'descending');
    } else {
      th.removeAttribute('aria-sort');
    }
  }
  const words = filter.value.trim().toLowerCase();
  const value = SORT_VALUES[sort.key];
  const shown = clients
    .filter((c) => matches(c, words))
    .sort((a, b) => {
      const [x, y] = [value(a), value(b)];
      const order = typeof x === 'string' ? x.localeCompare(y) : x - y;
      return order * sort.dir || a.name.localeCompare(b.name);
    });
  const rows = shown.map((c) => {
    const { limits = {}, usage } = c;
    const row = el('tr');
    row.dataset.client = c.name;
    const name = el('th', '', c.name);
    name.scope = 'row';
    const state = el('td');
    state.append(el('span', `state state-${c.state}`, c.state || '—'));
    row.append(
      name,
      state,
      measure(usage.requests_last_minute, limits.requests_per_minute, integer.format, ' req'),
      measure(usage.tokens_last_minute, limits.tokens_per_minute, integer.format, ' tok'),
      measure(usage.tokens_today, limits.tokens_per_day, integer.format, ' tok'),
    );
    if (dollars) {
      row.append(
        measure(usage.usd_today, limits.usd_per_day, usd, ''),
        measure(usage.usd_this_month, limits.usd_per_month, usd, ''),
      );
    }
    row.append(measure(usage.in_flight, limits.max_concurrent_requests, integer.format, ''));
    const refused = el('td', 'refusals');
    const reasons = Object.entries(usage.refusals_last_hour || {}).sort((a, b) => b[1] - a[1]);
    if (reasons.length === 0) {
      refused.append(el('span', 'muted', 'none'));
    }
    for (const [reason, count] of reasons) {
      refused.append(el('span', 'refusal', `${reason}: ${integer.format(count)}`));
    }
    row.append(refused);
    return row;
  });
  document.querySelector('#clients tbody').replaceChildren(...rows);
  $('clients-empty').hidden = rows.length > 0 || clients.length === 0;
}

// ---- upstreams ----

function renderUpstreams(upstreams) {
  const rows = upstreams.map((u) => {
    const row = el('tr');
    row.dataset.upstream = u.name;
    const name = el('th', '', u.name);
    name.scope = 'row';
    const breaker = el('td');
    breaker.append(el('span', `breaker breaker-${u.breaker.state}`, u.breaker.state.replace('_', '-')));
    if (u.breaker.closes_at) {
      breaker.append(' may close ', time(u.breaker.closes_at));
    }
    const keys = el('td');
    const list = el('div', 'keys');
    for (const key of u.keys || []) {
      const chip = el('span', `key key-${key.state}`, `#${key.position} ${key.state}`);
      if (key.resting_until) {
        chip.append(' until ', time(key.resting_until));
      }
      list.append(chip);
    }
    keys.append(list);
    row.append(
      name,
      el('td', 'num', String(u.tier)),
      el('td', 'num', String(u.weight)),
      breaker,
      el('td', 'num', integer.format(u.in_flight)),
      el('td', u.last_failure ? '' : 'muted', u.last_failure || '—'),
      keys,
    );
    return row;
  });
  document.querySelector('#upstreams tbody').replaceChildren(...rows);
}

// ---- spend ----

function spendRows(table, report, what) {
  const groups = (report && report.groups) || [];
  const rows = groups.map((group) => {
    const row = el('tr');
    row.dataset.key = group.key;
    const name = el('th', '', group.key);
    name.scope = 'row';
    row.append(
      name,
      el('td', 'num', usd(group.usd_today)),
      el('td', 'num', usd(group.usd_this_month)),
      el('td', 'num', `${integer.format(group.requests_today)} req`),
    );
    return row;
  });
  if (rows.length === 0) {
    const cell = el('td', 'muted', `No spend by ${what} this month.`);
    cell.colSpan = 4;
    const row = el('tr');
    row.append(cell);
    rows.push(row);
  }
  $(table).querySelector('tbody').replaceChildren(...rows);
}

function renderSpend(byModel, byUpstream) {
  const section = $('spend');
  section.hidden = !byModel && !byUpstream;
  if (section.hidden) {
    return;
  }
  const report = byModel || byUpstream;
  const period = $('spend-period');
  period.textContent = `UTC day ${report.day}, month ${report.month}`;
  period.title = 'Days and months end at midnight UTC, as the budgets do.';
  $('spend-model').closest('.scroll').hidden = !byModel;
  $('spend-upstream').closest('.scroll').hidden = !byUpstream;
  spendRows('spend-model', byModel, 'model');
  spendRows('spend-upstream', byUpstream, 'upstream');
}

// ---- the hour ----

const SVG = 'http://www.w3.org/2000/svg';

function chart(container, minutes, value, label, format) {
  const width = 600;
  const height = 64;
  const values = minutes.map(value);
  const peak = Math.max(...values, 0);
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.setAttribute('preserveAspectRatio', 'none');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', `${label} over the last hour, minute by minute; peak ${format(peak)}`);
  const step = width / Math.max(values.length, 1);
  values.forEach((v, i) => {
    const h = peak > 0 ? Math.max((v / peak) * (height - 2), v > 0 ? 1 : 0) : 0;
    const bar = document.createElementNS(SVG, 'rect');
    bar.setAttribute('class', 'bar');
    bar.setAttribute('x', String(i * step + 1));
    bar.setAttribute('y', String(height - 1 - h));
    bar.setAttribute('width', String(Math.max(step - 2, 1)));
    bar.setAttribute('height', String(h));
    const title = document.createElementNS(SVG, 'title');
    title.textContent = `${new Date(minutes[i].minute).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })}: ${format(v)}`;
    bar.append(title);
    svg.append(bar);
  });
  const base = document.createElementNS(SVG, 'line');
  base.setAttribute('class', 'base');
  base.setAttribute('x1', '0');
  base.setAttribute('x2', String(width));
  base.setAttribute('y1', String(height - 0.5));
  base.setAttribute('y2', String(height - 0.5));
  svg.append(base);
  container.replaceChildren(svg);
}

function renderActivity(activity) {
  $('mode').textContent = activity.mode;
  const minutes = activity.minutes || [];
  const requests = minutes.reduce((sum, m) => sum + m.requests, 0);
  const spent = minutes.reduce((sum, m) => sum + m.usd, 0);
  $('requests-now').textContent = `${integer.format(requests)} req/h`;
  $('usd-hour').textContent = `${usd(spent)}/h`;
  chart($('requests-chart'), minutes, (m) => m.requests, 'Requests per minute', (v) => `${integer.format(v)} req`);
  chart($('usd-chart'), minutes, (m) => m.usd, 'Dollars per minute', usd);
}

// ---- wiring ----

form.addEventListener('submit', (event) => {
  event.preventDefault();
  const typed = input.value.trim();
  // Out of the field at once: the page keeps no copy of it.
  input.value = '';
  if (typed) {
    sessionStorage.setItem(TOKEN_KEY, typed);
    say('');
    refresh();
  }
});

forget.addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(timer);
  timer = null;
  say('');
  showForm(false);
  input.focus();
});

for (const th of document.querySelectorAll('#clients th[data-key]')) {
  th.querySelector('button').addEventListener('click', () => {
    const key = th.dataset.key;
    sort = { key, dir: sort.key === key ? -sort.dir : 1 };
    renderClients();
  });
}

filter.addEventListener('input', renderClients);

document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible') {
    refresh();
  } else {
    clearTimeout(timer);
    timer = null;
  }
});

showForm(Boolean(token()));
refresh();
