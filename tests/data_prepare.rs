//! `algpt2-ddp prepare` as a user runs it: each source layout, the train-only tokenizer,
//! packing, cache reuse and invalidation, and every bad input with its message.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A config for `prepare` over the given splits, caching under `dir/cache`.
fn config(dir: &Path, format: &str, train: &str, valid: Option<&str>, vocab: usize, extra: &str) -> String {
    let valid = valid.map(|v| format!("  valid: {v}\n")).unwrap_or_default();
    write_config(
        dir,
        "data.yaml",
        &format!(
            "data:\n  format: {format}\n  train: {train}\n{valid}  cache_dir: {}\ntokenizer:\n  vocab_size: {vocab}\nmodel:\n  vocab_size: {vocab}\ntrain:\n  seq_len: 16\n{extra}",
            dir.join("cache").display()
        ),
    )
}

fn prepare(cfg: &str) -> std::process::Output {
    run(&["prepare", "--config", cfg])
}

/// The one cache directory under `dir/cache` and its manifest.
fn cache(dir: &Path) -> (PathBuf, Value) {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir.join("cache")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    dirs.sort_by_key(|d| std::fs::metadata(d).unwrap().modified().unwrap());
    let newest = dirs.pop().expect("a cache directory");
    let manifest = serde_json::from_str(&std::fs::read_to_string(newest.join("manifest.json")).unwrap()).unwrap();
    (newest, manifest)
}

/// Token ids of a token file (64-byte header, u16 ids at these vocab sizes).
fn tokens(path: &Path) -> Vec<u32> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"ALGPT2TK");
    bytes[64..].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect()
}

fn shared(file: &str) -> String {
    repo().join("tests/data/wikitext-2").join(file).display().to_string()
}

#[test]
fn wikitext_layout_from_the_shipped_wikitext2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "auto", &shared("wiki.valid.tokens"), Some(&shared("wiki.test.tokens")), 2048, "");
    let out = prepare(&cfg);
    assert!(out.status.success(), "{}", stderr(&out));
    let (cache_dir, manifest) = cache(dir.path());
    assert_eq!(manifest["splits"]["train"]["documents"], 60);
    assert!(manifest["splits"]["valid"]["tokens"].as_u64().unwrap() > 100_000);
    assert!(cache_dir.join("tokenizer.json").is_file());
    // A second prepare reuses the complete cache.
    let again = prepare(&cfg);
    assert!(stderr(&again).contains("is complete"), "{}", stderr(&again));

    // The raw layout (wikitext-103-raw/wiki.*.raw) reads the same way.
    let raw_dir = dir.path().join("wikitext-2-raw");
    std::fs::create_dir_all(&raw_dir).unwrap();
    std::fs::copy(shared("wiki.valid.tokens"), raw_dir.join("wiki.train.raw")).unwrap();
    let cfg = config(dir.path(), "auto", &raw_dir.join("wiki.train.raw").display().to_string(), None, 1024, "");
    let out = prepare(&cfg);
    assert!(out.status.success(), "{}", stderr(&out));
    let (cache_dir, manifest) = cache(dir.path());
    assert!(cache_dir.file_name().unwrap().to_string_lossy().starts_with("wikitext-2-raw-"));
    assert_eq!(manifest["splits"]["train"]["documents"], 60);
}

#[test]
fn text_and_jsonl_layouts_pack_documents_between_separators() {
    let dir = tempfile::tempdir().unwrap();
    let docs = ["first document text.", "second one,\nwith two lines.", "third: ünïcode ✓"];
    let jsonl: String = docs.iter().map(|d| serde_json::json!({ "text": d }).to_string() + "\n").collect();
    std::fs::write(dir.path().join("train.jsonl"), jsonl.repeat(20)).unwrap();
    let cfg = config(dir.path(), "auto", &dir.path().join("train.jsonl").display().to_string(), None, 300, "");
    let out = prepare(&cfg);
    assert!(out.status.success(), "{}", stderr(&out));
    let (cache_dir, manifest) = cache(dir.path());
    assert_eq!(manifest["splits"]["train"]["documents"], 60);
    let ids = tokens(&cache_dir.join("train.bin"));
    let tokenizer: Value = serde_json::from_str(&std::fs::read_to_string(cache_dir.join("tokenizer.json")).unwrap()).unwrap();
    let eot = tokenizer["added_tokens"][0]["id"].as_u64().unwrap() as u32;
    assert_eq!(tokenizer["added_tokens"][0]["content"], "<|endoftext|>");
    // Separator first and last, one between documents, and nothing else added: the
    // stream is exactly separator + document tokens, repeated.
    assert_eq!(ids[0], eot);
    assert_eq!(*ids.last().unwrap(), eot);
    assert_eq!(ids.iter().filter(|&&t| t == eot).count(), 61);
    let per_cycle: Vec<&[u32]> = ids[1..].split(|&t| t == eot).filter(|s| !s.is_empty()).collect();
    assert_eq!(per_cycle.len(), 60);
    assert_eq!(per_cycle[0], per_cycle[3], "the same document encodes the same way");

    // Plain text: one document per file.
    std::fs::write(dir.path().join("a.txt"), "alpha beta gamma\n".repeat(50)).unwrap();
    std::fs::write(dir.path().join("b.txt"), "delta epsilon\n".repeat(50)).unwrap();
    let cfg = config(dir.path(), "text", &format!("{}/*.txt", dir.path().display()), None, 280, "");
    let out = prepare(&cfg);
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, manifest) = cache(dir.path());
    assert_eq!(manifest["splits"]["train"]["documents"], 2);
}

#[test]
fn tokenizer_is_trained_on_the_train_split_only() {
    let dir = tempfile::tempdir().unwrap();
    // A word that fills valid but never appears in train: trained on valid, BPE would
    // make it one token.
    std::fs::write(dir.path().join("train.txt"), "the cat sat on the mat. ".repeat(400)).unwrap();
    std::fs::write(dir.path().join("valid.txt"), "zqxjvwkyzqxjvwky ".repeat(2000)).unwrap();
    let cfg = config(
        dir.path(),
        "text",
        &dir.path().join("train.txt").display().to_string(),
        Some(&dir.path().join("valid.txt").display().to_string()),
        400,
        "",
    );
    let out = prepare(&cfg);
    assert!(out.status.success(), "{}", stderr(&out));
    let (cache_dir, manifest) = cache(dir.path());
    let vocab = std::fs::read_to_string(cache_dir.join("tokenizer.json")).unwrap();
    assert!(vocab.contains("mat"), "train words are merged");
    assert!(!vocab.contains("zqx"), "no merge comes from the valid split");
    // Every valid character is then its own byte token: 17 bytes per repetition.
    let valid_tokens = manifest["splits"]["valid"]["tokens"].as_u64().unwrap();
    assert!(valid_tokens > 2000 * 16, "{valid_tokens}");
}

#[test]
fn changed_data_or_tokenizer_builds_a_new_cache() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.txt");
    std::fs::write(&train, "one two three four five six seven.\n".repeat(100)).unwrap();
    let cfg = config(dir.path(), "text", &train.display().to_string(), None, 300, "");
    assert!(prepare(&cfg).status.success());
    let (first, first_manifest) = cache(dir.path());

    // Same path, new content: a different cache, never the stale one.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&train, "eight nine ten.\n".repeat(100)).unwrap();
    let out = prepare(&cfg);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("building token cache"), "{}", stderr(&out));
    let (second, second_manifest) = cache(dir.path());
    assert_ne!(first, second);
    assert_ne!(first_manifest["splits"]["train"]["tokens"], second_manifest["splits"]["train"]["tokens"]);

    // Another tokenizer setting: another cache.
    let cfg2 = config(dir.path(), "text", &train.display().to_string(), None, 290, "");
    assert!(stderr(&prepare(&cfg2)).contains("building token cache"));

    // A token file damaged in place is detected and rebuilt.
    let cfg = config(dir.path(), "text", &train.display().to_string(), None, 300, "");
    let bin = second.join("train.bin");
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[30] ^= 0xff; // inside the tokenizer hash
    std::fs::write(&bin, bytes).unwrap();
    let out = prepare(&cfg);
    assert!(stderr(&out).contains("building token cache"), "{}", stderr(&out));
    assert!(tokens(&bin).len() > 10);
}

#[test]
fn loaded_tokenizer_json_is_used_and_hashed_into_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.txt");
    std::fs::write(&train, "red green blue yellow.\n".repeat(200)).unwrap();
    let cfg = config(dir.path(), "text", &train.display().to_string(), None, 300, "");
    assert!(prepare(&cfg).status.success());
    let (first, _) = cache(dir.path());
    let saved = dir.path().join("tok.json");
    std::fs::copy(first.join("tokenizer.json"), &saved).unwrap();
    let cfg = config(dir.path(), "text", &train.display().to_string(), None, 300, "");
    let with_path = std::fs::read_to_string(&cfg).unwrap().replace("tokenizer:\n", &format!("tokenizer:\n  path: {}\n", saved.display()));
    std::fs::write(&cfg, with_path).unwrap();
    let out = prepare(&cfg);
    assert!(out.status.success(), "{}", stderr(&out));
    let (second, manifest) = cache(dir.path());
    assert_ne!(first, second);
    let first_manifest: Value = serde_json::from_str(&std::fs::read_to_string(first.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["tokenizer_hash"], first_manifest["tokenizer_hash"]);
    assert_eq!(tokens(&first.join("train.bin")), tokens(&second.join("train.bin")));
}

/// Runs prepare and returns its stderr, asserting it failed.
fn refused(cfg: &str) -> String {
    let out = prepare(cfg);
    assert!(!out.status.success(), "prepare should fail");
    stderr(&out)
}

#[test]
fn bad_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();

    // Missing file.
    let err = refused(&config(dir.path(), "auto", &p("nope.tokens"), None, 300, ""));
    assert!(err.contains("data.train") && err.contains("nope.tokens") && err.contains("file not found"), "{err}");

    // Empty split.
    std::fs::write(p("empty.txt"), "").unwrap();
    let err = refused(&config(dir.path(), "text", &p("empty.txt"), None, 300, ""));
    assert!(err.contains("data.train is empty") && err.contains("empty.txt"), "{err}");

    // Non-UTF-8 bytes.
    std::fs::write(p("latin1.txt"), b"caf\xe9 au lait\n").unwrap();
    let err = refused(&config(dir.path(), "text", &p("latin1.txt"), None, 300, ""));
    assert!(err.contains("latin1.txt, line 1: not valid UTF-8"), "{err}");

    // A split smaller than one window.
    std::fs::write(p("big.txt"), "plenty of words in this training file.\n".repeat(100)).unwrap();
    std::fs::write(p("tiny.txt"), "hi\n").unwrap();
    let err = refused(&config(dir.path(), "text", &p("big.txt"), Some(&p("tiny.txt")), 300, ""));
    assert!(err.contains("data.valid") && err.contains("tiny.txt") && err.contains("no window of train.seq_len + 1 = 17"), "{err}");

    // A tokenizer larger than the model's vocabulary.
    let cfg = config(dir.path(), "text", &p("big.txt"), None, 300, "");
    assert!(prepare(&cfg).status.success());
    let (cache_dir, _) = cache(dir.path());
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            "tokenizer:\n  vocab_size: 300",
            &format!("tokenizer:\n  vocab_size: 257\n  path: {}", cache_dir.join("tokenizer.json").display()),
        )
        .replace("model:\n  vocab_size: 300", "model:\n  vocab_size: 260");
    std::fs::write(&cfg, text).unwrap();
    let err = refused(&cfg);
    // (BPE on so little variety stops short of 300 tokens, but far above 260.)
    assert!(
        err.contains("tokens but model.vocab_size is 260: set model.vocab_size to at least") && err.contains("tokenizer.json"),
        "{err}"
    );

    // Unknown layout.
    std::fs::write(p("data.csv"), "a,b\n").unwrap();
    let err = refused(&config(dir.path(), "auto", &p("data.csv"), None, 300, ""));
    assert!(err.contains("data.csv") && err.contains("set data.format"), "{err}");
}

#[test]
fn parquet_layout_wikitext_shards_and_plain_shards() {
    let dir = tempfile::tempdir().unwrap();
    // HF's WikiText shards hold the lines of the text files, one per row.
    let text = std::fs::read_to_string(shared("wiki.valid.tokens")).unwrap();
    let lines: Vec<String> = text.split_inclusive('\n').map(String::from).collect();
    let shard = dir.path().join("wikitext-2-raw-v1/train-00000-of-00001.parquet");
    write_parquet(&shard, &lines, 500);
    let out = prepare(&config(dir.path(), "auto", &shard.display().to_string(), None, 600, ""));
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, manifest) = cache(dir.path());
    assert_eq!(manifest["splits"]["train"]["documents"], 60, "articles, as from the text file");
    assert_eq!(manifest["splits"]["train"]["bytes"].as_u64().unwrap(), text.len() as u64);

    // Any other shard: one document per row.
    let docs: Vec<String> = (0..40).map(|i| format!("document number {i} says hello.")).collect();
    let shard = dir.path().join("corpus/part-0.parquet");
    write_parquet(&shard, &docs, 500);
    let out = prepare(&config(dir.path(), "parquet", &shard.display().to_string(), None, 300, ""));
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, manifest) = cache(dir.path());
    assert_eq!(manifest["splits"]["train"]["documents"], 40);

    // A missing shard is named (column and type errors are unit-tested in data::parquet).
    let err = refused(&config(dir.path(), "parquet", &dir.path().join("wiki.parquet").display().to_string(), None, 300, ""));
    assert!(err.contains("wiki.parquet") && err.contains("file not found"), "{err}");
}

#[test]
fn concurrent_prepares_of_one_cache_all_succeed_with_one_build() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.txt");
    std::fs::write(&train, "alpha beta gamma delta, epsilon zeta eta theta.\n".repeat(3000)).unwrap();
    let cfg = config(dir.path(), "text", &train.display().to_string(), None, 300, "");
    let racers: Vec<_> = (0..3).map(|_| spawn(std::process::Command::new(bin()).args(["prepare", "--config", &cfg]))).collect();
    let mut logs = String::new();
    for r in racers {
        let out = finish_bounded(r, LIMIT);
        assert!(out.status.success(), "{}", stderr(&out));
        logs += &stderr(&out);
    }
    // One builds; the others wait for it (or come after it) and reuse its cache.
    assert_eq!(logs.lines().filter(|l| l.contains("INFO building token cache")).count(), 1, "{logs}");
    assert_eq!(logs.matches("is complete").count(), 2, "{logs}");
    let entries: Vec<String> = std::fs::read_dir(dir.path().join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .filter(|n: &String| !n.ends_with(".lock"))
        .collect();
    assert_eq!(entries.len(), 1, "one cache, no leftovers: {entries:?}");
    let (cache_dir, manifest) = cache(dir.path());
    assert_eq!(tokens(&cache_dir.join("train.bin")).len() as u64, manifest["splits"]["train"]["tokens"].as_u64().unwrap());
}

/// Rewrites the manifest's checksums of `split` to match its token file as it is now,
/// as a damage that also reached the manifest would.
fn rechecksum(cache_dir: &Path, split: &str) {
    let bytes = std::fs::read(cache_dir.join(format!("{split}.bin"))).unwrap();
    let path = cache_dir.join("manifest.json");
    let mut manifest: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    manifest["splits"][split]["chunk_crc32"] = bytes.chunks(16 << 20).map(crc32fast::hash).collect::<Vec<u32>>().into();
    std::fs::write(&path, manifest.to_string()).unwrap();
}

#[test]
fn a_damaged_token_cache_is_rebuilt_not_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.txt");
    std::fs::write(&train, "the quick brown fox jumps over the lazy dog, again and again.\n".repeat(400)).unwrap();
    let cfg = config(dir.path(), "text", &train.display().to_string(), None, 300, "");
    assert!(prepare(&cfg).status.success());
    let (cache_dir, _) = cache(dir.path());
    let bin = cache_dir.join("train.bin");
    let clean = tokens(&bin);

    // Every second token set to another valid id: the header still checks out.
    let mut bytes = std::fs::read(&bin).unwrap();
    for at in (64..bytes.len()).step_by(4) {
        bytes[at..at + 2].copy_from_slice(&(clean[0] as u16).to_le_bytes());
    }
    std::fs::write(&bin, &bytes).unwrap();
    let out = prepare(&cfg);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("is damaged") && err.contains("do not match their checksum") && err.contains("building token cache"), "{err}");
    assert_eq!(tokens(&bin), clean, "the rebuilt cache is the first build");

    // Ids outside the vocabulary, the checksums rewritten to match: the ids are checked too.
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[64 + 2 * 10..64 + 2 * 11].copy_from_slice(&65000u16.to_le_bytes());
    std::fs::write(&bin, &bytes).unwrap();
    rechecksum(&cache_dir, "train");
    let err = stderr(&prepare(&cfg));
    assert!(err.contains("token 10 is id 65000, outside the tokenizer's") && err.contains("building token cache"), "{err}");
    assert_eq!(tokens(&bin), clean);

    // A damaged tokenizer.json in the cache: rebuilt too, not "complete" and then refused.
    std::fs::write(cache_dir.join("tokenizer.json"), "{ not a tokenizer").unwrap();
    let out = prepare(&cfg);
    let err = stderr(&out);
    assert!(out.status.success() && err.contains("is damaged") && err.contains("building token cache"), "{err}");
    assert!(!err.contains("is complete"), "{err}");

    // Training starts the same way: a damaged cache is rebuilt before any step.
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&bin, &bytes).unwrap();
    let runs = dir.path().join("runs");
    let mut args: Vec<String> = ["train", "--config", &cfg].iter().map(|s| s.to_string()).collect();
    for set in [
        "device=cpu", "model.n_embd=16", "model.embedding_size=8", "model.n_head=2", "model.n_layer=1", "model.n_positions=16",
        "train.micro_batch_size=2", "train.max_steps=2", "wandb.mode=disabled",
    ] {
        args.extend(["--set".to_string(), set.to_string()]);
    }
    args.push(format!("--set=out_dir={}", runs.display()));
    let out = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let log = std::fs::read_to_string(runs.join("data/train.log")).unwrap();
    assert!(log.contains("is damaged") && log.contains("building token cache"), "{log}");
    assert_eq!(tokens(&bin), clean);
}

/// What `prepare` says its peak memory was, in MB.
fn peak_mb(log: &str) -> f64 {
    let line = log.lines().find(|l| l.contains("peak memory of prepare:")).unwrap_or_else(|| panic!("no peak memory line in {log}"));
    line.rsplit(": ").next().unwrap().trim_end_matches(" MB").trim().parse().unwrap()
}

#[test]
fn one_long_line_is_read_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("one-line.txt");
    // 16 MiB of words and not one line end (today's code needed ~3 GB for it).
    let words = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do"];
    let mut text = String::with_capacity(17 << 20);
    let mut i = 0usize;
    while text.len() < 16 << 20 {
        text.push_str(words[(i * 7 + i / 10) % words.len()]);
        text.push(' ');
        i += 1;
    }
    std::fs::write(&train, &text).unwrap();
    let cfg = config(dir.path(), "text", &train.display().to_string(), None, 300, "");
    let out = prepare(&cfg);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("one-line.txt, line 1: longer than 1024 KiB without a line end"), "{err}");
    let peak = peak_mb(&err);
    eprintln!("FIGURE one 16 MiB line: prepare peaked at {peak:.0} MB");
    assert!(peak < 1000.0, "prepare peaked at {peak} MB");
    let (cache_dir, manifest) = cache(dir.path());
    assert_eq!(manifest["splits"]["train"]["documents"], 1);
    assert!(tokens(&cache_dir.join("train.bin")).len() > 1_000_000);
}

#[test]
fn a_killed_prepare_leaves_nothing_behind_for_long() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.txt");
    let line: String = (0..200).map(|i| format!("w{} ", i * 31 % 997)).collect::<String>() + "\n";
    std::fs::write(&train, line.repeat(8000)).unwrap();
    let cfg = config(dir.path(), "text", &train.display().to_string(), None, 400, "");
    let mut child = spawn(std::process::Command::new(bin()).args(["prepare", "--config", &cfg]));
    let temporary = || -> Vec<PathBuf> {
        std::fs::read_dir(dir.path().join("cache"))
            .map(|d| d.map(|e| e.unwrap().path()).filter(|p| p.to_string_lossy().contains(".tmp-")).collect())
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while temporary().is_empty() {
        assert!(child.is_running(), "prepare ended before it could be killed");
        assert!(std::time::Instant::now() < deadline, "no temporary build directory appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill();
    finish_bounded(child, LIMIT);
    let left = temporary();
    assert_eq!(left.len(), 1, "{left:?}");
    let out = prepare(&cfg);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("left by a token cache build that was interrupted"), "{err}");
    assert!(temporary().is_empty(), "{:?}", temporary());
}

#[test]
fn a_full_disk_names_the_cache_file_and_says_the_disk_is_full() {
    if let Some(why) = cannot_mount_tmpfs() {
        eprintln!("skipped: no small tmpfs for a real full disk ({why}); src/data/token_file.rs fills /dev/full instead");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "wikitext", &shared("wiki.valid.tokens"), None, 512, "");
    let mount = dir.path().join("cache");
    std::fs::create_dir_all(&mount).unwrap();
    // The cache goes to a 128 KiB tmpfs in a private mount namespace: room for the
    // tokenizer, not for the ~500 KB of train.bin.
    let script = r#"mount -t tmpfs -o size=128k tmpfs "$MOUNT" || exit 99; "$@""#;
    let out = run_bounded(
        std::process::Command::new("unshare")
            .args(["-rm", "sh", "-c", script, "sh", bin(), "prepare", "--config", &cfg])
            .env("MOUNT", &mount)
            .current_dir(repo()),
        LIMIT,
    );
    assert_ne!(out.status.code(), Some(99), "mount failed: {}", stderr(&out));
    assert!(!out.status.success(), "prepare must fail on a full disk");
    let err = stderr(&out);
    assert!(err.contains("the token cache does not fit on the disk of data.cache_dir"), "{err}");
    assert!(err.contains(&format!("cannot write {}/", mount.display())) && err.contains("train.bin.tmp: No space left on device"), "{err}");
}

#[test]
fn files_that_are_not_text_or_not_files_are_named_for_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(p("big.txt"), "plenty of words in this training file.\n".repeat(100)).unwrap();

    // A gzip file (its header, then deflated bytes): named as such, with the command that
    // unpacks it, under data.format: text and under auto (whose extension says nothing).
    std::fs::write(p("train.txt.gz"), b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\x2b\xc9\xc8\x2c\x06\x00").unwrap();
    for format in ["text", "auto"] {
        let err = refused(&config(dir.path(), format, &p("train.txt.gz"), None, 300, ""));
        assert!(err.contains("data.train") && err.contains("train.txt.gz is gzip-compressed, not text"), "{err}");
        assert!(err.contains(&format!("gunzip -k {}", p("train.txt.gz"))) && !err.contains("latin1"), "{err}");
    }
    // UTF-16 as Windows editors write it (a byte order mark, then little-endian units).
    let utf16: Vec<u8> = [0xFF, 0xFE].into_iter().chain("some words\n".encode_utf16().flat_map(u16::to_le_bytes)).collect();
    std::fs::write(p("utf16.txt"), utf16).unwrap();
    let err = refused(&config(dir.path(), "text", &p("utf16.txt"), None, 300, ""));
    assert!(err.contains("utf16.txt is UTF-16 text") && err.contains("iconv -f UTF-16 -t UTF-8") && !err.contains("latin1"), "{err}");

    // Not regular files: said at once, without opening them (a FIFO would block the read).
    let err = refused(&config(dir.path(), "text", "/dev/zero", None, 300, ""));
    assert!(err.contains("data.train: /dev/zero: not a regular file (a character device)"), "{err}");
    let fifo = dir.path().join("fifo.txt");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    let started = std::time::Instant::now();
    let err = refused(&config(dir.path(), "text", &p("big.txt"), Some(&p("fifo.txt")), 300, ""));
    assert!(err.contains("data.valid") && err.contains("fifo.txt: not a regular file (a FIFO)"), "{err}");
    assert!(!err.contains("file not found"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "prepare waited on the FIFO");
    let err = refused(&config(dir.path(), "text", &format!("{}/*.txt", dir.path().display()), None, 300, ""));
    assert!(err.contains("fifo.txt, not a regular file (a FIFO)"), "{err}");
}

#[test]
fn an_eval_split_that_is_also_trained_on_is_warned_of() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let p = |name: &str| data.join(name).display().to_string();
    std::fs::write(p("train.txt"), "plenty of words in this training file.\n".repeat(100)).unwrap();
    std::fs::write(p("valid.txt"), "other words, held out from training, for validation.\n".repeat(20)).unwrap();
    let leak = "leaks into training";

    // Separate files: no warning.
    let out = prepare(&config(dir.path(), "text", &p("train.txt"), Some(&p("valid.txt")), 300, ""));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains(leak), "{}", stderr(&out));

    // The same file, by another spelling of its path.
    let again = format!("{}/../data/train.txt", data.display());
    let out = prepare(&config(dir.path(), "text", &p("train.txt"), Some(&again), 300, ""));
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("data.valid {again} is also in data.train")) && err.contains("the valid split leaks into training"),
        "{err}"
    );

    // A glob for train that takes in the valid file.
    let out = prepare(&config(dir.path(), "text", &format!("{}/*.txt", data.display()), Some(&p("valid.txt")), 300, ""));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("data.valid {} is also in data.train", p("valid.txt"))), "{}", stderr(&out));

    // A copy of the train file: the same bytes.
    std::fs::copy(p("train.txt"), dir.path().join("copy.txt")).unwrap();
    let copy = dir.path().join("copy.txt").display().to_string();
    let out = prepare(&config(dir.path(), "text", &p("train.txt"), Some(&copy), 300, ""));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("holds the same bytes as the data.train file {}", p("train.txt"))), "{}", stderr(&out));
}
