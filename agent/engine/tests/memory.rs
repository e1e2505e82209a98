//! The engine's memory: models loaded whole stay within `engine.max_memory`, the least recently used
//! unloaded first, and a keep-alive of "for ever" does not keep a model past that budget.

use std::time::Duration;

use sollol_engine::engine::{Engine, FOREVER, discover};

mod support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_recently_used_model_makes_room_within_max_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["a", "b", "c"] {
        std::os::unix::fs::symlink(
            support::model_path(),
            dir.path().join(format!("{name}.gguf")),
        )
        .expect("link");
    }
    let files = discover(dir.path(), None);
    let size = files[0].size_bytes;
    // Room for two of the three.
    let engine =
        Engine::new(files, 1, Duration::from_secs(300)).with_max_memory(Some(size * 5 / 2));
    let loaded = |engine: &Engine| {
        let mut names: Vec<String> = engine
            .loaded()
            .iter()
            .map(|(model, _)| model.file.name.clone())
            .collect();
        names.sort();
        names
    };
    engine.get("a", Some(FOREVER)).await.expect("a");
    engine.get("b", None).await.expect("b");
    engine
        .get("a", None)
        .await
        .expect("a again: b is now the least recently used");
    assert_eq!(loaded(&engine), ["a:latest", "b:latest"]);
    engine.get("c", None).await.expect("c");
    assert_eq!(loaded(&engine), ["a:latest", "c:latest"]);
    engine.get("b", None).await.expect("b");
    assert_eq!(
        loaded(&engine),
        ["b:latest", "c:latest"],
        "for ever is within the budget too"
    );
    // A budget smaller than one model refuses it with the sizes.
    let small = Engine::new(discover(dir.path(), None), 1, Duration::from_secs(300))
        .with_max_memory(Some(size / 2));
    let refused = small.get("a", None).await.expect_err("too large");
    assert!(
        refused.to_string().contains("max_memory") || refused.to_string().contains("needs"),
        "{refused}"
    );
}
