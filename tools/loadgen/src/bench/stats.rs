//! The arithmetic of the report: medians, rounding, the order of the rounds and the paired
//! ratio of a feature's row against its base row.

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

/// Round `round`'s order of the plain targets: groups of compared rows (quiet, proxy, routed,
/// limited, shared; clients1, clients10k) stay together, the groups and single targets rotate,
/// and on odd rounds each group runs backwards, so no row always runs first. A target joins the
/// group before it when it is compared with any row of that group: "proxy" is compared with
/// three rows, so one of them ("limited", after "routed") runs one row away from it.
pub fn plain_order(targets: &[String], round: usize) -> Vec<String> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    for t in targets {
        match groups.last_mut() {
            Some(g)
                if g.iter()
                    .any(|member| PAIRS.contains(&(member.as_str(), t.as_str()))) =>
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

/// CPU per request of the feature's row over the base row's: the median over rounds of the
/// ratio within each round, where the two ran close together (see `plain_order`). A shared VM's
/// speed drifts by more than 5% from one round to the next at c=32 even with nothing else
/// running; within a round it mostly cancels out. The arguments are the rounds' CPU per request.
pub fn paired_ratio(base: &[Option<f64>], with_feature: &[Option<f64>]) -> Option<f64> {
    median(
        base.iter()
            .zip(with_feature)
            .filter_map(|(b, w)| match (b, w) {
                (Some(b), Some(w)) if *b != 0.0 && *w != 0.0 => Some(w / b),
                _ => None,
            }),
    )
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
}
