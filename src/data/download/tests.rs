//! The download against a loopback server that serves files with Range support and
//! misbehaves on request: drops, errors, 429s, stalls, ignored ranges.

use super::fetch::{build_client, part_path, Fetcher, RetryPolicy, Target};
use super::*;
use fake_server::{FakeServer, Reply};
use std::io::Write;
use std::time::Instant;

/// Test fetcher: short backoff, a short timeout, and no proxy (loopback must stay loopback).
fn fetcher(retries: u32) -> Fetcher {
    Fetcher {
        client: build_client(Duration::from_millis(500), false).unwrap(),
        retry: RetryPolicy { retries, base_delay: Duration::from_millis(10), max_delay: Duration::from_secs(2) },
        progress: false,
    }
}

fn sample(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(bytes))
}

fn fetch(fetcher: &Fetcher, url: &str, dest: &Path, sha256: Option<&str>) -> anyhow::Result<()> {
    fetcher.fetch(&Target { url, dest, sha256, size: None, by_hand: "place it by hand" })
}

#[test]
fn plain_download_is_verified_and_renamed() {
    let body = sample(100_000);
    let server = FakeServer::start(vec![("/f.bin", body.clone())], vec![]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    fetch(&fetcher(0), &server.url("f.bin"), &dest, Some(&sha256_hex(&body))).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), body);
    assert!(!part_path(&dest).exists());
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].range, None);
}

#[test]
fn resumes_after_a_dropped_connection() {
    let body = sample(200_000);
    let server = FakeServer::start(vec![("/f.bin", body.clone())], vec![Reply::DropAfter(70_000)]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    fetch(&fetcher(2), &server.url("f.bin"), &dest, Some(&sha256_hex(&body))).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), body);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].range, None);
    assert_eq!(requests[1].range.as_deref(), Some("bytes=70000-"));
}

#[test]
fn resumes_a_part_left_by_an_earlier_run() {
    let body = sample(50_000);
    let server = FakeServer::start(vec![("/f.bin", body.clone())], vec![]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    fs::write(part_path(&dest), &body[..12_345]).unwrap();
    fetch(&fetcher(0), &server.url("f.bin"), &dest, Some(&sha256_hex(&body))).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), body);
    assert_eq!(server.requests()[0].range.as_deref(), Some("bytes=12345-"));
}

#[test]
fn complete_part_answered_with_416_is_kept() {
    let body = sample(10_000);
    let server = FakeServer::start(vec![("/f.bin", body.clone())], vec![]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    fs::write(part_path(&dest), &body).unwrap();
    fetch(&fetcher(0), &server.url("f.bin"), &dest, Some(&sha256_hex(&body))).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), body);
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn part_longer_than_the_file_is_restarted_without_using_a_retry() {
    let body = sample(50_000);
    let server = FakeServer::start(vec![("/f.bin", body.clone())], vec![]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    fs::write(part_path(&dest), vec![0x55; 60_000]).unwrap();
    fetch(&fetcher(0), &server.url("f.bin"), &dest, Some(&sha256_hex(&body))).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), body);
    let ranges: Vec<_> = server.requests().into_iter().map(|r| r.range).collect();
    assert_eq!(ranges, [Some("bytes=60000-".to_string()), None]);
}

#[test]
fn retries_after_a_server_error() {
    let body = sample(5_000);
    let server = FakeServer::start(vec![("/f.bin", body.clone())], vec![Reply::Status500]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    fetch(&fetcher(2), &server.url("f.bin"), &dest, Some(&sha256_hex(&body))).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), body);
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn honours_retry_after_on_429() {
    let body = sample(5_000);
    let server = FakeServer::start(vec![("/f.bin", body.clone())], vec![Reply::TooManyRequests { retry_after_s: 1 }]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    let started = Instant::now();
    fetch(&fetcher(2), &server.url("f.bin"), &dest, Some(&sha256_hex(&body))).unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1), "waited only {:?}", started.elapsed());
    assert_eq!(fs::read(&dest).unwrap(), body);
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn retries_a_timeout() {
    let body = sample(5_000);
    let server = FakeServer::start(vec![("/f.bin", body.clone())], vec![Reply::Stall(Duration::from_millis(900))]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    fetch(&fetcher(2), &server.url("f.bin"), &dest, Some(&sha256_hex(&body))).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), body);
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn not_found_fails_at_once_with_url_and_status() {
    let server = FakeServer::start(vec![], vec![]);
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("missing.zip");
    let err = fetch(&fetcher(3), &url, &dir.path().join("missing.zip"), None).unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains(&url) && message.contains("404"), "{message}");
    assert!(matches!(err.downcast_ref(), Some(DownloadError::Status { .. })));
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn gives_up_after_the_configured_retries() {
    let server = FakeServer::start(vec![("/f.bin", sample(100))], vec![Reply::Status500; 10]);
    let dir = tempfile::tempdir().unwrap();
    let err = fetch(&fetcher(2), &server.url("f.bin"), &dir.path().join("f.bin"), None).unwrap_err();
    assert!(format!("{err:#}").contains("gave up after 3 attempts"), "{err:#}");
    assert_eq!(server.requests().len(), 3);
}

#[test]
fn checksum_mismatch_deletes_the_download() {
    let body = sample(5_000);
    let server = FakeServer::start(vec![("/f.bin", body.clone())], vec![]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    let wrong = sha256_hex(b"something else");
    let err = fetch(&fetcher(0), &server.url("f.bin"), &dest, Some(&wrong)).unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains(&wrong) && message.contains(&sha256_hex(&body)), "{message}");
    assert!(message.contains(&dest.display().to_string()), "{message}");
    assert!(!dest.exists() && !part_path(&dest).exists());
}

#[test]
fn present_file_is_not_downloaded_again() {
    let body = sample(5_000);
    let server = FakeServer::start(vec![("/f.bin", body.clone())], vec![]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    fs::write(&dest, &body).unwrap();
    let opts = DownloadOptions { dest_dir: dir.path().to_path_buf(), progress: false, ..DownloadOptions::default() };
    download_file(&server.url("f.bin"), &dest, Some(&sha256_hex(&body)), &opts).unwrap();
    assert_eq!(server.requests().len(), 0);
}

#[test]
fn wrong_file_at_dest_is_replaced() {
    let body = sample(5_000);
    let server = FakeServer::start(vec![("/f.bin", body.clone())], vec![]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    fs::write(&dest, b"stale").unwrap();
    fetch(&fetcher(0), &server.url("f.bin"), &dest, Some(&sha256_hex(&body))).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), body);
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn server_ignoring_range_restarts_from_zero() {
    let body = sample(50_000);
    let server = FakeServer::start(vec![("/f.bin", body.clone())], vec![Reply::IgnoreRange]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    // Garbage in the part: if it were kept, the checksum would fail.
    fs::write(part_path(&dest), vec![0xAA; 20_000]).unwrap();
    fetch(&fetcher(0), &server.url("f.bin"), &dest, Some(&sha256_hex(&body))).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), body);
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].range.as_deref(), Some("bytes=20000-"));
}

/// The size a 200 announces (Content-Length) is checked before anything is written.
#[test]
fn server_reporting_another_size_is_refused_before_downloading() {
    let body = sample(5_000);
    let server = FakeServer::start(vec![("/f.bin", body.clone())], vec![]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    let url = server.url("f.bin");
    let target = Target { url: &url, dest: &dest, sha256: None, size: Some(4_000), by_hand: "place it by hand" };
    let err = fetcher(3).fetch(&target).unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("reports a file of 5000 bytes, expected 4000"), "{message}");
    assert!(matches!(err.downcast_ref(), Some(DownloadError::SizeMismatch { .. })));
    assert!(!dest.exists() && !part_path(&dest).exists());
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn unreachable_host_explains_how_to_work_offline() {
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{closed_port}/wikitext-103-v1.zip");
    let err = fetch(&fetcher(1), &url, &dir.path().join("w.zip"), None).unwrap_err();
    let message = format!("{err:#}");
    for needle in ["could not reach", &url, "needs internet access", "--base-url", "by hand"] {
        assert!(message.contains(needle), "missing {needle:?} in: {message}");
    }
    assert!(matches!(err.downcast_ref(), Some(DownloadError::Unreachable { .. })));
}

/// A small archive laid out like the published one, plus entries that must be ignored.
fn small_wikitext_zip(extra: &[(&str, &[u8])]) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    use zip::write::SimpleFileOptions;
    let files: Vec<(String, Vec<u8>)> = SPLITS
        .iter()
        .map(|split| (format!("wiki.{split}.tokens"), format!(" = {split} = \n some text for {split} \n").into_bytes()))
        .collect();
    let mut writer = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    writer.add_directory("wikitext-103/", options).unwrap();
    for (name, bytes) in &files {
        writer.start_file(format!("wikitext-103/{name}"), options).unwrap();
        writer.write_all(bytes).unwrap();
    }
    for (name, bytes) in extra {
        writer.start_file(*name, options).unwrap();
        writer.write_all(bytes).unwrap();
    }
    (writer.finish().unwrap().into_inner(), files)
}

fn test_archive(zip_bytes: &[u8]) -> Archive {
    Archive { sha256: sha256_hex(zip_bytes), size: Some(zip_bytes.len() as u64), ..Archive::published(Wikitext103Variant::Tokens) }
}

#[test]
fn wikitext_is_downloaded_unpacked_and_then_left_alone() {
    let (zip_bytes, files) = small_wikitext_zip(&[("wikitext-103/README", b"not wanted")]);
    let server = FakeServer::start(vec![("/mirror/wikitext-103-v1.zip", zip_bytes.clone())], vec![]);
    let dir = tempfile::tempdir().unwrap();
    let opts = DownloadOptions {
        base_url: server.url("mirror/"),
        dest_dir: dir.path().to_path_buf(),
        retries: 0,
        timeout: Duration::from_secs(1),
        progress: false,
    };
    let archive = test_archive(&zip_bytes);
    let data_dir = fetch_and_unpack(&archive, &opts, &fetcher(0)).unwrap();
    assert_eq!(data_dir, dir.path().join("wikitext-103"));
    for (name, bytes) in &files {
        assert_eq!(&fs::read(data_dir.join(name)).unwrap(), bytes);
    }
    let mut left: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["wikitext-103"], "archive, part and staging dir are gone");
    assert_eq!(fs::read_dir(&data_dir).unwrap().count(), 3, "only the three split files");
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].path, "/mirror/wikitext-103-v1.zip");

    fetch_and_unpack(&archive, &opts, &fetcher(0)).unwrap();
    assert_eq!(server.requests().len(), 1, "second run makes no request");
}

#[test]
fn interrupted_unpack_is_redone_from_an_archive_placed_by_hand() {
    let (zip_bytes, files) = small_wikitext_zip(&[]);
    let server = FakeServer::start(vec![], vec![]);
    let dir = tempfile::tempdir().unwrap();
    let opts = DownloadOptions {
        base_url: server.url(""),
        dest_dir: dir.path().to_path_buf(),
        retries: 0,
        timeout: Duration::from_secs(1),
        progress: false,
    };
    // As an interrupted run leaves it: one file moved into place, a staging dir.
    fs::create_dir_all(dir.path().join("wikitext-103")).unwrap();
    fs::write(dir.path().join("wikitext-103").join(&files[0].0), &files[0].1).unwrap();
    fs::create_dir_all(dir.path().join(".wikitext-103.unpacking")).unwrap();
    fs::write(dir.path().join(".wikitext-103.unpacking/wiki.valid.tokens"), b"half").unwrap();
    fs::write(dir.path().join("wikitext-103-v1.zip"), &zip_bytes).unwrap();

    let data_dir = fetch_and_unpack(&test_archive(&zip_bytes), &opts, &fetcher(0)).unwrap();
    for (name, bytes) in &files {
        assert_eq!(&fs::read(data_dir.join(name)).unwrap(), bytes);
    }
    assert!(!dir.path().join(".wikitext-103.unpacking").exists());
    assert_eq!(server.requests().len(), 0);
}

#[test]
fn archive_with_an_escaping_path_is_refused() {
    let (zip_bytes, _) = small_wikitext_zip(&[("../escaped.txt", b"outside")]);
    let server = FakeServer::start(vec![("/wikitext-103-v1.zip", zip_bytes.clone())], vec![]);
    let root = tempfile::tempdir().unwrap();
    let dest_dir = root.path().join("data");
    let opts = DownloadOptions {
        base_url: server.url(""),
        dest_dir: dest_dir.clone(),
        retries: 0,
        timeout: Duration::from_secs(1),
        progress: false,
    };
    let err = fetch_and_unpack(&test_archive(&zip_bytes), &opts, &fetcher(0)).unwrap_err();
    assert!(format!("{err:#}").contains("outside the destination"), "{err:#}");
    assert!(!root.path().join("escaped.txt").exists());
    assert!(!dest_dir.join("wikitext-103").exists());
    assert!(!dest_dir.join(".wikitext-103.unpacking").exists());
}

#[test]
fn variant_names_round_trip() {
    for variant in [Wikitext103Variant::Tokens, Wikitext103Variant::Raw] {
        assert_eq!(variant.to_string().parse::<Wikitext103Variant>().unwrap(), variant);
    }
    assert!("wikitext".parse::<Wikitext103Variant>().is_err());
}

#[test]
fn published_archives_name_their_files() {
    let raw = Archive::published(Wikitext103Variant::Raw);
    assert_eq!(raw.member_names(), ["wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"]);
    assert_eq!(join_url(DEFAULT_BASE_URL, raw.file_name), format!("{DEFAULT_BASE_URL}wikitext-103-raw-v1.zip"));
    assert_eq!(join_url("http://m/x", "a.zip"), "http://m/x/a.zip");
}

#[test]
fn backoff_grows_is_capped_and_yields_to_retry_after() {
    let policy = RetryPolicy { retries: 9, base_delay: Duration::from_secs(1), max_delay: Duration::from_secs(8) };
    for retry in 0..8 {
        let ceiling = Duration::from_secs(1 << retry.min(3));
        let delay = policy.delay(retry, None);
        assert!(delay >= ceiling / 2 && delay <= ceiling, "retry {retry}: {delay:?}");
    }
    assert_eq!(policy.delay(0, Some(Duration::from_secs(3))), Duration::from_secs(3));
    assert_eq!(policy.delay(0, Some(Duration::from_secs(600))), Duration::from_secs(8));
}

/// A loopback HTTP/1.1 server for the tests: one connection per request (`Connection:
/// close`), one scripted reply per request in arrival order. Hand-written because a
/// dropped connection mid-body is one of the replies, which a server crate hides.
mod fake_server {
    use std::collections::HashMap;
    use std::io::{self, BufRead, BufReader, Write};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread;
    use std::time::Duration;

    #[derive(Clone, Debug)]
    pub enum Reply {
        /// 200 or 206 as the request asks.
        Normal,
        /// Headers as for `Normal`, then only this many body bytes, then close.
        DropAfter(usize),
        Status500,
        TooManyRequests {
            retry_after_s: u64,
        },
        /// 200 with the whole file even when a Range was asked for.
        IgnoreRange,
        /// Waits this long before answering normally (for client timeouts).
        Stall(Duration),
    }

    #[derive(Clone, Debug)]
    pub struct Recorded {
        pub path: String,
        pub range: Option<String>,
    }

    struct Shared {
        files: HashMap<String, Vec<u8>>,
        script: Vec<Reply>,
        requests: Mutex<Vec<Recorded>>,
        stop: AtomicBool,
    }

    pub struct FakeServer {
        addr: SocketAddr,
        shared: Arc<Shared>,
    }

    impl FakeServer {
        /// `files`: path → bytes (absent paths get 404); `script`: the reply to each
        /// request in order, `Normal` after the script runs out.
        pub fn start(files: Vec<(&str, Vec<u8>)>, script: Vec<Reply>) -> FakeServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let shared = Arc::new(Shared {
                files: files.into_iter().map(|(p, b)| (p.to_string(), b)).collect(),
                script,
                requests: Mutex::new(Vec::new()),
                stop: AtomicBool::new(false),
            });
            let server = shared.clone();
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if server.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let server = server.clone();
                    thread::spawn(move || stream.and_then(|s| handle(&s, &server)));
                }
            });
            FakeServer { addr, shared }
        }

        pub fn url(&self, path: &str) -> String {
            format!("http://{}/{path}", self.addr)
        }

        pub fn requests(&self) -> Vec<Recorded> {
            self.shared.requests.lock().unwrap().clone()
        }
    }

    impl Drop for FakeServer {
        fn drop(&mut self) {
            self.shared.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr); // wakes the accept loop, which then ends
        }
    }

    fn handle(stream: &TcpStream, shared: &Shared) -> io::Result<()> {
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        // The request line and headers (a GET has no body).
        let mut head = Vec::new();
        for line in BufReader::new(stream).lines() {
            let line = line?;
            if line.is_empty() {
                break;
            }
            head.push(line);
        }
        let path = head.first().and_then(|l| l.split_whitespace().nth(1)).unwrap_or("/").to_string();
        let range = head.iter().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim().eq_ignore_ascii_case("range").then(|| value.trim().to_string())
        });
        let reply = {
            let mut requests = shared.requests.lock().unwrap();
            requests.push(Recorded { path: path.clone(), range: range.clone() });
            shared.script.get(requests.len() - 1).cloned().unwrap_or(Reply::Normal)
        };
        let Some(body) = shared.files.get(&path) else {
            return respond(stream, "404 Not Found", &[], b"not found", None);
        };
        let from = range.as_deref().and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse::<usize>().ok());
        match reply {
            Reply::Status500 => respond(stream, "500 Internal Server Error", &[], b"oops", None),
            Reply::TooManyRequests { retry_after_s } => {
                respond(stream, "429 Too Many Requests", &[("Retry-After", retry_after_s.to_string())], b"slow down", None)
            }
            Reply::IgnoreRange => respond(stream, "200 OK", &[], body, None),
            Reply::Stall(wait) => {
                thread::sleep(wait);
                serve(stream, body, from, None)
            }
            Reply::Normal => serve(stream, body, from, None),
            Reply::DropAfter(n) => serve(stream, body, from, Some(n)),
        }
    }

    /// A file or its tail from `from`, cut after `cut` body bytes when asked.
    fn serve(stream: &TcpStream, body: &[u8], from: Option<usize>, cut: Option<usize>) -> io::Result<()> {
        let total = body.len();
        match from {
            None => respond(stream, "200 OK", &[], body, cut),
            Some(first) if first >= total => {
                respond(stream, "416 Range Not Satisfiable", &[("Content-Range", format!("bytes */{total}"))], b"", None)
            }
            Some(first) => {
                let range = format!("bytes {first}-{}/{total}", total - 1);
                respond(stream, "206 Partial Content", &[("Content-Range", range)], &body[first..], cut)
            }
        }
    }

    /// Announces all of `body`, sends it, or only its first `cut` bytes and then closes.
    fn respond(mut stream: &TcpStream, status: &str, headers: &[(&str, String)], body: &[u8], cut: Option<usize>) -> io::Result<()> {
        let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(&body[..cut.unwrap_or(body.len()).min(body.len())])?;
        stream.flush()?;
        if cut.is_some() {
            stream.shutdown(Shutdown::Both)?;
        }
        Ok(())
    }
}
