//! Which upstream of a tier serves the next request: smooth weighted round-robin, the algorithm
//! nginx uses for its upstream weights. Every eligible member gains its weight, the one with the
//! most is picked and gives back the sum of the eligible weights. Weights 3:1 then serve exactly
//! 3 of every 4 requests, interleaved (A A B A) rather than in runs, so a burst of requests never
//! lands all on one upstream.
//!
//! The counters live per group (one tier's candidates for a model), so the share of one model's
//! upstreams does not depend on what other models were asked for.

use parking_lot::Mutex;
use rustc_hash::FxHashMap;

/// The round-robin state of every group. A blocking mutex: it is held for one pass over a
/// handful of counters and never across an `.await`.
#[derive(Debug, Default)]
pub struct Rotation {
    /// Group key -> each member's current weight, in the order of the group's members. The
    /// key is a hash already, and a request looks its group up every time: no SipHash.
    groups: Mutex<FxHashMap<u64, Vec<i64>>>,
}

impl Rotation {
    pub fn new() -> Rotation {
        Rotation::default()
    }

    /// The upstream index that serves next among `members` (upstream index, weight) of `group`,
    /// counting only those `eligible` accepts; `None` when none is.
    ///
    /// A member that is not eligible neither gains nor gives back: the others keep their
    /// proportions among themselves, and it rejoins where it left. On a tie the member listed
    /// first wins, as in nginx.
    pub fn pick(
        &self,
        group: u64,
        members: &[(usize, u32)],
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let mut groups = self.groups.lock();
        let current = groups.entry(group).or_default();
        // A group key names a set of upstreams; should the set it stands for ever change shape,
        // the old counters mean nothing for it.
        if current.len() != members.len() {
            *current = vec![0; members.len()];
        }
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for (slot, &(upstream, weight)) in members.iter().enumerate() {
            if !eligible(upstream) {
                continue;
            }
            let weight = i64::from(weight);
            current[slot] += weight;
            total += weight;
            if best.is_none_or(|best| current[slot] > current[best]) {
                best = Some(slot);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(members[best].0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY: fn(usize) -> bool = |_| true;

    fn picks(
        rotation: &Rotation,
        group: u64,
        members: &[(usize, u32)],
        eligible: impl Fn(usize) -> bool,
        count: usize,
    ) -> Vec<usize> {
        (0..count)
            .map(|_| rotation.pick(group, members, &eligible).unwrap())
            .collect()
    }

    fn count_of(picked: &[usize], upstream: usize) -> usize {
        picked.iter().filter(|&&p| p == upstream).count()
    }

    #[test]
    fn weights_three_to_one_interleave_as_nginx_does() {
        let rotation = Rotation::new();
        // nginx's counters for A=3, B=1: (3,1) A -> (-1,1); (2,2) tie, A -> (-2,2);
        // (1,3) B -> (1,-1); (4,0) A -> (0,0), and the cycle starts again.
        assert_eq!(
            picks(&rotation, 1, &[(7, 3), (9, 1)], EVERY, 8),
            [7, 7, 9, 7, 7, 7, 9, 7]
        );
    }

    #[test]
    fn weights_spread_the_picks_evenly_rather_than_in_runs() {
        let rotation = Rotation::new();
        // nginx's documented example: weights 5, 1, 1 give a a b a c a a.
        assert_eq!(
            picks(&rotation, 1, &[(0, 5), (1, 1), (2, 1)], EVERY, 7),
            [0, 0, 1, 0, 2, 0, 0]
        );
    }

    #[test]
    fn four_hundred_picks_at_three_to_one_are_exactly_three_hundred_and_one_hundred() {
        let rotation = Rotation::new();
        let picked = picks(&rotation, 1, &[(0, 3), (1, 1)], EVERY, 400);
        assert_eq!(count_of(&picked, 0), 300);
        assert_eq!(count_of(&picked, 1), 100);
        // Exact in every window of four, not only over the whole run.
        for four in picked.chunks(4) {
            assert_eq!(count_of(four, 1), 1, "{four:?}");
        }
    }

    #[test]
    fn equal_weights_alternate() {
        let rotation = Rotation::new();
        assert_eq!(
            picks(&rotation, 1, &[(4, 1), (5, 1)], EVERY, 6),
            [4, 5, 4, 5, 4, 5]
        );
    }

    #[test]
    fn an_ineligible_member_is_skipped_and_the_others_keep_their_proportions() {
        let rotation = Rotation::new();
        let members = [(0, 3), (1, 2), (2, 1)];
        let picked = picks(&rotation, 1, &members, |upstream| upstream != 1, 400);
        assert_eq!(count_of(&picked, 1), 0);
        assert_eq!(count_of(&picked, 0), 300);
        assert_eq!(count_of(&picked, 2), 100);
        assert_eq!(&picked[..4], [0, 0, 2, 0]);
    }

    #[test]
    fn a_member_that_was_skipped_rejoins_with_its_share() {
        let rotation = Rotation::new();
        let members = [(0, 1), (1, 1)];
        assert_eq!(picks(&rotation, 1, &members, |u| u != 0, 3), [1, 1, 1]);
        let picked = picks(&rotation, 1, &members, EVERY, 600);
        assert_eq!(count_of(&picked, 0), 300);
        assert_eq!(count_of(&picked, 1), 300);
    }

    #[test]
    fn a_group_with_no_eligible_member_has_no_pick() {
        let rotation = Rotation::new();
        assert_eq!(rotation.pick(1, &[(0, 3), (1, 1)], |_| false), None);
        assert_eq!(rotation.pick(2, &[], EVERY), None);
        // Nothing was charged while none was eligible: the rotation starts as new.
        assert_eq!(
            picks(&rotation, 1, &[(0, 3), (1, 1)], EVERY, 4),
            [0, 0, 1, 0]
        );
    }

    #[test]
    fn groups_turn_independently() {
        let rotation = Rotation::new();
        let first = [(0, 1), (1, 1)];
        let second = [(0, 1), (2, 1)];
        assert_eq!(rotation.pick(0b011, &first, EVERY), Some(0));
        // Another group's pick does not advance this one, and the reverse.
        assert_eq!(rotation.pick(0b101, &second, EVERY), Some(0));
        assert_eq!(rotation.pick(0b101, &second, EVERY), Some(2));
        assert_eq!(rotation.pick(0b011, &first, EVERY), Some(1));
        assert_eq!(rotation.pick(0b011, &first, EVERY), Some(0));
        assert_eq!(rotation.pick(0b101, &second, EVERY), Some(0));
    }

    #[test]
    fn a_group_whose_members_change_in_number_starts_over() {
        let rotation = Rotation::new();
        assert_eq!(rotation.pick(1, &[(0, 1), (1, 1)], EVERY), Some(0));
        assert_eq!(
            picks(&rotation, 1, &[(0, 3), (1, 1), (2, 1)], EVERY, 5),
            [0, 1, 0, 2, 0]
        );
    }
}
