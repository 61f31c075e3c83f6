//! Reading a config file's text. `--config` takes any path, and `std::fs::read_to_string`
//! on `/dev/zero` grew to 8 GB in 6 s, while on a FIFO it waited for a writer forever; so
//! only a regular file is read, and only up to a size no config comes near.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The largest config file read. The shipped ones are about 2 KiB.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The text of the config at `path`, or why it cannot be one (one line, without the path).
pub fn config_text(path: &Path) -> Result<String, String> {
    // Checked before opening: opening a FIFO for reading blocks until a writer appears.
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    check_regular(&meta)?;
    // O_NONBLOCK in case the path was swapped for a FIFO since: the open then returns at
    // once, and the second check below refuses it. A regular file ignores the flag.
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(|e| e.to_string())?;
    check_regular(&file.metadata().map_err(|e| e.to_string())?)?;
    read_capped(file)
}

/// What a path that is not a regular file is: "a directory", "a FIFO", "a character
/// device", ... (also for the data files, which are refused the same way).
pub fn file_kind(kind: std::fs::FileType) -> &'static str {
    if kind.is_file() {
        "a regular file"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a plain file"
    }
}

fn check_regular(meta: &Metadata) -> Result<(), String> {
    if !meta.file_type().is_file() {
        return Err(format!("not a regular file ({}); a config must be a regular YAML file", file_kind(meta.file_type())));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_large(meta.len()));
    }
    Ok(())
}

/// Reads at most one byte past the cap, so a file that grows after the size check (or
/// reports no size, as /proc's do) still cannot make the read unbounded.
fn read_capped(file: File) -> Result<String, String> {
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!("more than {MAX_CONFIG_BYTES} bytes read, over the 1 MiB limit for a config file"));
    }
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()))
}

fn too_large(len: u64) -> String {
    format!("{len} bytes is over the 1 MiB ({MAX_CONFIG_BYTES} bytes) limit for a config file")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_up_to_the_cap_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "model:\n  n_layer: 2\n").unwrap();
        assert_eq!(config_text(&path).unwrap(), "model:\n  n_layer: 2\n");
        std::fs::write(&path, vec![b'#'; MAX_CONFIG_BYTES as usize]).unwrap();
        assert!(config_text(&path).is_ok());
        std::fs::write(&path, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).unwrap();
        let e = config_text(&path).unwrap_err();
        assert!(e.contains("1 MiB"), "{e}");
    }

    #[test]
    fn devices_directories_and_bad_text_are_refused() {
        let e = config_text(Path::new("/dev/zero")).unwrap_err();
        assert!(e.contains("a character device"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        assert!(config_text(dir.path()).unwrap_err().contains("a directory"));
        let path = dir.path().join("bin.yaml");
        std::fs::write(&path, b"a: \xff\n").unwrap();
        assert!(config_text(&path).unwrap_err().contains("not UTF-8"));
    }
}
