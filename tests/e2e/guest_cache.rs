//! The compiled-guest cache holds native code: the worker runs only entries it wrote itself,
//! into a directory nobody else can write.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::harness::{Options, Worker, greedy};

fn options(guest: &str, cache: &Path) -> Options {
    let mut options = Options::new(guest);
    options.cache_dir = Some(cache.to_owned());
    options
}

fn entries(cache: &Path) -> Vec<std::path::PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    entries.sort();
    entries
}

async fn guest_name_and_cached(worker: &Worker) -> (String, bool) {
    let info = worker.info().await;
    let active = &info["guest"]["active"];
    (
        active["name"].as_str().unwrap().to_owned(),
        active["from_cache"].as_bool().unwrap(),
    )
}

/// Another guest's compiled entry planted under this guest's name is not run: the worker
/// compiles the real guest again. (It used to deserialize whatever file had the name.)
#[tokio::test]
async fn a_planted_cache_entry_is_not_run() {
    let cache = tempfile::tempdir().unwrap();
    drop(Worker::start(options("shout", cache.path())).await);
    let shout_entry = entries(cache.path()).pop().expect("shout was not cached");
    let llm = Worker::start(options("llm", cache.path())).await;
    let (status, expected) = llm.infer(greedy("Hello", 4)).await;
    assert_eq!(status, 200, "{expected}");
    drop(llm);
    let llm_entry = entries(cache.path())
        .into_iter()
        .find(|e| *e != shout_entry)
        .expect("llm was not cached");
    std::fs::copy(&shout_entry, &llm_entry).unwrap();

    let worker = Worker::start(options("llm", cache.path())).await;
    assert_eq!(
        guest_name_and_cached(&worker).await,
        ("llm".to_owned(), false),
        "the planted entry was used"
    );
    let (status, body) = worker.infer(greedy("Hello", 4)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["text"], expected["text"], "another guest's code ran");
    drop(worker);

    // Recompiled and cached again, under a good tag this time.
    let again = Worker::start(options("llm", cache.path())).await;
    assert_eq!(
        guest_name_and_cached(&again).await,
        ("llm".to_owned(), true)
    );
}

/// A cache directory other users can write is not used: the worker serves, compiling the
/// guest, and writes nothing there.
#[tokio::test]
async fn a_cache_directory_others_can_write_is_refused() {
    let cache = tempfile::tempdir().unwrap();
    std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let worker = Worker::start(options("llm", cache.path())).await;
    assert_eq!(
        guest_name_and_cached(&worker).await,
        ("llm".to_owned(), false)
    );
    let (status, body) = worker.infer(greedy("Hello", 2)).await;
    assert_eq!(status, 200, "{body}");
    let written: Vec<_> = std::fs::read_dir(cache.path()).unwrap().collect();
    assert!(
        written.is_empty(),
        "wrote into the refused cache: {written:?}"
    );
}
