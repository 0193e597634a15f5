//! Replays the fuzzers' saved corpora, so every input they ever kept stays checked by `cargo test`.

#[path = "../../fuzz/invariants/rewrite.rs"]
mod rewrite_invariants;

#[test]
fn rewrite_corpus_holds_every_invariant() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/rewrite");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).expect("the corpus directory exists") {
        let path = entry.unwrap().path();
        let input = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| rewrite_invariants::check_rewrite(&input));
        assert!(
            outcome.is_ok(),
            "corpus entry {} breaks an invariant",
            path.display()
        );
        replayed += 1;
    }
    assert!(replayed >= 5, "only {replayed} corpus entries found");
}
