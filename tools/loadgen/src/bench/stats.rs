//! The arithmetic of the report: medians, rounding, the order of the rounds and the paired
//! ratio of a feature's row against its base row.

use serde::Serialize;

use super::settings::twin_of;

/// The median of the values (the mean of the middle two for an even count), None when empty.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// The median of the values that are there.
pub fn median_some(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    median(values.into_iter().flatten())
}

pub fn round_to(v: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (v * scale).round() / scale
}

pub fn round3(v: f64) -> f64 {
    round_to(v, 3)
}

/// `items` rotated left by `n`.
pub fn rotate<T: Clone>(items: &[T], n: usize) -> Vec<T> {
    if items.is_empty() {
        return Vec::new();
    }
    let n = n % items.len();
    items[n..].iter().chain(&items[..n]).cloned().collect()
}

/// (base, feature) rows compared by `paired_ratio`, so run close to each other.
pub const PAIRS: [(&str, &str); 6] = [
    ("quiet", "proxy"),
    ("proxy", "routed"),
    ("proxy", "limited"),
    ("limited", "priced"),
    ("limited", "shared"),
    ("clients1", "clients10k"),
];

/// True when `t` is `member`'s twin run from the base binary ("base:proxy" for "proxy").
fn is_twin(member: &str, t: &str) -> bool {
    twin_of(member) == Some(t)
}

/// Round `round`'s order of the plain targets: groups of compared rows (quiet, proxy, routed,
/// limited, shared; clients1, clients10k) stay together, the groups and single targets rotate,
/// and on odd rounds each group runs backwards, so no row always runs first. A target joins the
/// group before it when it is compared with any row of that group: "proxy" is compared with
/// three rows, so one of them ("limited", after "routed") runs one row away from it. A twin
/// from the base binary (`Settings::set_base` puts it right after its target) joins its
/// target's group there, so the two always run back to back, in turns first.
pub fn plain_order(targets: &[String], round: usize) -> Vec<String> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    for t in targets {
        match groups.last_mut() {
            Some(g)
                if g.iter().any(|member| {
                    PAIRS.contains(&(member.as_str(), t.as_str())) || is_twin(member, t)
                }) =>
            {
                g.push(t.clone())
            }
            _ => groups.push(vec![t.clone()]),
        }
    }
    rotate(&groups, round)
        .into_iter()
        .flat_map(|mut g| {
            if round % 2 == 1 {
                g.reverse();
            }
            g
        })
        .collect()
}

/// Round `round`'s order of the streaming targets: rotated each round, as the plain ones are,
/// with a twin from the base binary kept right next to its target and, on odd rounds, before
/// it. Without twins, the targets simply rotate.
pub fn stream_order(targets: &[String], round: usize) -> Vec<String> {
    let mut units: Vec<Vec<String>> = Vec::new();
    for t in targets {
        match units.last_mut() {
            Some(u) if u.len() == 1 && is_twin(&u[0], t) => u.push(t.clone()),
            _ => units.push(vec![t.clone()]),
        }
    }
    rotate(&units, round)
        .into_iter()
        .flat_map(|mut u| {
            if round % 2 == 1 {
                u.reverse();
            }
            u
        })
        .collect()
}

/// Each round's ratio of the second row's figure over the first's, for the rounds where both
/// have a non-zero figure, in round order.
pub fn round_ratios(base: &[Option<f64>], with_feature: &[Option<f64>]) -> Vec<f64> {
    base.iter()
        .zip(with_feature)
        .filter_map(|(b, w)| match (b, w) {
            (Some(b), Some(w)) if *b != 0.0 && *w != 0.0 => Some(w / b),
            _ => None,
        })
        .collect()
}

/// CPU per request of the feature's row over the base row's: the median over rounds of the
/// ratio within each round, where the two ran close together (see `plain_order`). A shared VM's
/// speed drifts by more than 5% from one round to the next at c=32 even with nothing else
/// running; within a round it mostly cancels out. The arguments are the rounds' CPU per request.
pub fn paired_ratio(base: &[Option<f64>], with_feature: &[Option<f64>]) -> Option<f64> {
    median(round_ratios(base, with_feature))
}

/// A row's figure over the same figure of its twin from the base binary, round by round.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Paired {
    /// The median of the rounds' ratios (as `paired_ratio`).
    pub ratio: f64,
    pub min: f64,
    pub max: f64,
    /// Each round's ratio, in round order (rounds without both figures left out).
    pub rounds: Vec<f64>,
}

/// The current binary's figures (`current`) against the base binary's (`base`), round by round;
/// None when no round has both.
pub fn paired(base: &[Option<f64>], current: &[Option<f64>]) -> Option<Paired> {
    let rounds: Vec<f64> = round_ratios(base, current)
        .into_iter()
        .map(round3)
        .collect();
    Some(Paired {
        ratio: round3(paired_ratio(base, current)?),
        min: rounds.iter().copied().fold(f64::INFINITY, f64::min),
        max: rounds.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        rounds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median([]), None);
        assert_eq!(median_some([None, Some(5.0), None]), Some(5.0));
        assert_eq!(round3(1.23456), 1.235);
    }

    #[test]
    fn paired_ratio_is_the_median_of_the_rounds_ratios() {
        // Pooled, 120 vs 100 would be +20%; per round the feature costs 10%, 20%, 5% more.
        let base = [Some(100.0), Some(50.0), Some(200.0)];
        let with = [Some(110.0), Some(60.0), Some(210.0)];
        assert!((paired_ratio(&base, &with).unwrap() - 1.1).abs() < 1e-9);
        // A round without a figure on either side is left out.
        let with_gap = [Some(110.0), None, Some(210.0)];
        assert!((paired_ratio(&base, &with_gap).unwrap() - 1.075).abs() < 1e-9);
        assert_eq!(paired_ratio(&[None], &[Some(1.0)]), None);
    }

    #[test]
    fn compared_rows_stay_neighbours_while_the_order_rotates() {
        let targets = names(&[
            "direct",
            "nginx",
            "quiet",
            "proxy",
            "routed",
            "limited",
            "shared",
            "clients1",
            "clients10k",
        ]);
        assert_eq!(plain_order(&targets, 0), targets);
        assert_eq!(
            plain_order(&targets, 1),
            names(&[
                "nginx",
                "shared",
                "limited",
                "routed",
                "proxy",
                "quiet",
                "clients10k",
                "clients1",
                "direct"
            ])
        );
        assert_eq!(
            plain_order(&targets, 2),
            names(&[
                "quiet",
                "proxy",
                "routed",
                "limited",
                "shared",
                "clients1",
                "clients10k",
                "direct",
                "nginx"
            ])
        );
        assert_eq!(rotate(&[1, 2, 3], 4), vec![2, 3, 1]);
    }

    #[test]
    fn twins_from_the_base_binary_run_next_to_their_targets_in_turns_first() {
        let targets = names(&[
            "direct",
            "quiet",
            "base:quiet",
            "proxy",
            "base:proxy",
            "routed",
            "limited",
            "base:limited",
            "clients1",
            "base:clients1",
        ]);
        assert_eq!(plain_order(&targets, 0), targets);
        let odd = plain_order(&targets, 1);
        assert_eq!(
            odd,
            names(&[
                "base:limited",
                "limited",
                "routed",
                "base:proxy",
                "proxy",
                "base:quiet",
                "quiet",
                "base:clients1",
                "clients1",
                "direct"
            ])
        );
        for round in 0..6 {
            let order = plain_order(&targets, round);
            for t in ["quiet", "proxy", "limited", "clients1"] {
                let at = order.iter().position(|x| x == t).unwrap();
                let twin = order
                    .iter()
                    .position(|x| *x == format!("base:{t}"))
                    .unwrap();
                assert_eq!(
                    twin as isize - at as isize,
                    if round % 2 == 0 { 1 } else { -1 },
                    "round {round}: {order:?}"
                );
            }
        }
    }

    #[test]
    fn streams_rotate_with_each_twin_beside_its_target() {
        let plain = names(&["direct", "nginx", "proxy", "routed", "proxy-h2"]);
        for round in 0..5 {
            assert_eq!(stream_order(&plain, round), rotate(&plain, round));
        }
        let targets = names(&[
            "direct",
            "proxy",
            "base:proxy",
            "routed",
            "proxy-h2",
            "base:proxy-h2",
        ]);
        assert_eq!(stream_order(&targets, 0), targets);
        assert_eq!(
            stream_order(&targets, 1),
            names(&[
                "base:proxy",
                "proxy",
                "routed",
                "base:proxy-h2",
                "proxy-h2",
                "direct"
            ])
        );
        assert_eq!(
            stream_order(&targets, 2),
            names(&[
                "routed",
                "proxy-h2",
                "base:proxy-h2",
                "direct",
                "proxy",
                "base:proxy"
            ])
        );
    }

    #[test]
    fn round_ratios_keep_the_rounds_with_both_figures() {
        let base = [Some(100.0), None, Some(200.0), Some(0.0)];
        let with = [Some(105.0), Some(60.0), Some(190.0), Some(1.0)];
        assert_eq!(round_ratios(&base, &with), vec![1.05, 0.95]);
        assert!((paired_ratio(&base, &with).unwrap() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn against_the_base_binary_the_rounds_ratios_give_median_and_range() {
        // Current binary over base: 2% more, 1% less, 4% more; the gap round is left out.
        let base = [Some(50.0), Some(100.0), None, Some(25.0)];
        let current = [Some(51.0), Some(99.0), Some(70.0), Some(26.0)];
        assert_eq!(
            paired(&base, &current),
            Some(Paired {
                ratio: 1.02,
                min: 0.99,
                max: 1.04,
                rounds: vec![1.02, 0.99, 1.04],
            })
        );
        // Two rounds: the median is their mean, rounded to 3 digits.
        let two = paired(&[Some(3.0), Some(3.0)], &[Some(3.1), Some(3.2)]).unwrap();
        assert_eq!((two.ratio, two.min, two.max), (1.05, 1.033, 1.067));
        assert_eq!(paired(&[None, Some(1.0)], &[Some(1.0), None]), None);
    }
}
