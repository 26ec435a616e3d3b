//! Replays the committed inputs through every target without instrumentation: a quick
//! regression check on any toolchain (`cargo test` in `fuzz/`). `corpus/<target>` holds the
//! seeds and merged finds; `regressions/<target>` holds the inputs of bugs the fuzzer found,
//! which must keep passing once fixed.

use std::path::Path;

fn replay(kind: &str, required: bool) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(kind);
    for (name, run) in netchannel_fuzz::TARGETS {
        let dir = root.join(name);
        if !dir.exists() && !required {
            continue;
        }
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            eprintln!("{name}: {}", path.display());
            run(&bytes);
            n += 1;
        }
        assert!(n > 0 || !required, "no inputs in {}", dir.display());
    }
}

#[test]
fn the_corpus_passes() {
    replay("corpus", true);
}

#[test]
fn the_inputs_of_past_bugs_pass() {
    replay("regressions", false);
}
