//! Replays the fuzzers' saved corpora, so every input they ever kept stays checked by `cargo test`.

#[path = "../../fuzz/invariants/rewrite.rs"]
mod rewrite_invariants;
#[path = "../../fuzz/invariants/usage.rs"]
mod usage_invariants;

/// Runs `check` on every file of `fuzz/corpus/<target>` and returns how many there were.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).expect("the corpus directory exists") {
        let path = entry.unwrap().path();
        let input = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&input));
        assert!(
            outcome.is_ok(),
            "corpus entry {} breaks an invariant",
            path.display()
        );
        replayed += 1;
    }
    replayed
}

#[test]
fn rewrite_corpus_holds_every_invariant() {
    let replayed = replay("rewrite", rewrite_invariants::check_rewrite);
    assert!(replayed >= 5, "only {replayed} corpus entries found");
}

#[test]
fn usage_corpus_holds_every_invariant() {
    let replayed = replay("usage", usage_invariants::check_usage);
    assert!(replayed >= 5, "only {replayed} corpus entries found");
}
