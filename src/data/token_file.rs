//! The binary token file: a 64-byte header, then little-endian token ids (u16 when the
//! vocabulary fits, else u32). Written to a temporary name and renamed when complete;
//! read through a memory map.
//!
//! Header: magic `ALGPT2TK` · version u32 · bytes per token u32 · token count u64 ·
//! sha256 of the tokenizer (32 bytes) · 8 reserved zero bytes.

use anyhow::{bail, Context};
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"ALGPT2TK";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 64;
/// Bytes per checksummed chunk: a whole number of tokens of either width, and large
/// enough that the checksums of a 500 MB file fit on a line of the manifest.
pub const CHECK_CHUNK_BYTES: usize = 16 << 20;

/// Bytes per stored token id for a vocabulary of `vocab_size` ids.
pub fn token_width(vocab_size: usize) -> u32 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// A token file opened for reading.
pub struct TokenFile {
    map: Mmap,
    width: u32,
    len: u64,
    pub tokenizer_hash: [u8; 32],
    pub path: PathBuf,
}

impl TokenFile {
    pub fn open(path: &Path) -> anyhow::Result<TokenFile> {
        let file = File::open(path).with_context(|| format!("cannot open token file {}", path.display()))?;
        // SAFETY: token files are written once under a temporary name and renamed into
        // place; nothing writes to a file after it has its final name.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let bad = |why: &str| anyhow::anyhow!("{} is not a valid token file: {why}", path.display());
        if map.len() < HEADER_BYTES || &map[..8] != MAGIC {
            return Err(bad("wrong magic (not written by algpt2-ddp prepare)"));
        }
        let version = u32::from_le_bytes(map[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(bad(&format!("version {version}, this build reads version {VERSION}")));
        }
        let width = u32::from_le_bytes(map[12..16].try_into().unwrap());
        if width != 2 && width != 4 {
            return Err(bad(&format!("{width} bytes per token")));
        }
        let len = u64::from_le_bytes(map[16..24].try_into().unwrap());
        let tokenizer_hash: [u8; 32] = map[24..56].try_into().unwrap();
        if (map.len() - HEADER_BYTES) as u64 != len * width as u64 {
            return Err(bad(&format!("header says {len} tokens but the file holds {} bytes of them", map.len() - HEADER_BYTES)));
        }
        Ok(TokenFile { map, width, len, tokenizer_hash, path: path.to_path_buf() })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn get(&self, index: u64) -> u32 {
        let at = HEADER_BYTES + (index * self.width as u64) as usize;
        match self.width {
            2 => u16::from_le_bytes([self.map[at], self.map[at + 1]]) as u32,
            _ => u32::from_le_bytes(self.map[at..at + 4].try_into().unwrap()),
        }
    }

    /// crc32 of each [`CHECK_CHUNK_BYTES`] of the whole file, header included: what the
    /// manifest records when the file is made and [`TokenFile::verify`] compares.
    pub fn chunk_checksums(&self) -> Vec<u32> {
        use rayon::prelude::*;
        self.map.par_chunks(CHECK_CHUNK_BYTES).map(crc32fast::hash).collect()
    }

    /// Checks every byte against `expected` (from [`TokenFile::chunk_checksums`] at build
    /// time) and every id against the vocabulary, on all cores; the error names the
    /// first damaged chunk or out-of-range token.
    pub fn verify(&self, expected: &[u32], vocab_size: usize) -> Result<(), String> {
        use rayon::prelude::*;
        let chunks = self.map.len().div_ceil(CHECK_CHUNK_BYTES);
        if expected.len() != chunks {
            return Err(format!("{} has {chunks} chunks, its manifest records {}", self.path.display(), expected.len()));
        }
        let width = self.width as usize;
        let problem = self.map.par_chunks(CHECK_CHUNK_BYTES).zip(expected).enumerate().find_map_first(|(i, (chunk, &crc))| {
            let start = i * CHECK_CHUNK_BYTES;
            if crc32fast::hash(chunk) != crc {
                return Some(format!(
                    "{}: bytes {start}..{} do not match their checksum (changed after it was built)",
                    self.path.display(),
                    start + chunk.len()
                ));
            }
            // Chunks and the header are whole numbers of tokens, so ids never straddle chunks.
            let skip = HEADER_BYTES.saturating_sub(start);
            let ids = &chunk[skip.min(chunk.len())..];
            let largest = match width {
                2 => ids.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).max(),
                _ => ids.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).max(),
            };
            match largest {
                Some(id) if id as usize >= vocab_size => {
                    let first = ((start + skip - HEADER_BYTES) / width) as u64;
                    let token = (first..first + (ids.len() / width) as u64).find(|&t| self.get(t) as usize >= vocab_size)?;
                    let id = self.get(token);
                    Some(format!("{}: token {token} is id {id}, outside the tokenizer's {vocab_size} ids", self.path.display()))
                }
                _ => None,
            }
        });
        problem.map_or(Ok(()), Err)
    }

    /// Appends tokens `start..start + count` to `out`.
    pub fn extend_range(&self, start: u64, count: usize, out: &mut Vec<i64>) {
        out.extend((start..start + count as u64).map(|i| self.get(i) as i64));
    }
}

/// Streams token ids into a new token file.
pub struct TokenWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    dest: PathBuf,
    width: u32,
    len: u64,
    max_id: u32,
}

impl TokenWriter {
    pub fn create(dest: &Path, width: u32, tokenizer_hash: &[u8; 32]) -> anyhow::Result<TokenWriter> {
        let tmp = dest.with_extension("bin.tmp");
        let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut header = [0u8; HEADER_BYTES];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&width.to_le_bytes());
        header[24..56].copy_from_slice(tokenizer_hash);
        out.write_all(&header).with_context(|| format!("cannot write {}", tmp.display()))?;
        Ok(TokenWriter { out, tmp, dest: dest.to_path_buf(), width, len: 0, max_id: (1u64 << (8 * width)).saturating_sub(1) as u32 })
    }

    pub fn push(&mut self, ids: &[u32]) -> anyhow::Result<()> {
        for &id in ids {
            if id > self.max_id {
                bail!("token id {id} does not fit in {} bytes", self.width);
            }
            let written = match self.width {
                2 => self.out.write_all(&(id as u16).to_le_bytes()),
                _ => self.out.write_all(&id.to_le_bytes()),
            };
            written.with_context(|| format!("cannot write {}", self.tmp.display()))?;
        }
        self.len += ids.len() as u64;
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Writes the count into the header, syncs, and renames the file into place.
    pub fn finish(self) -> anyhow::Result<u64> {
        let TokenWriter { out, tmp, dest, len, .. } = self;
        let mut file = out.into_inner().map_err(|e| anyhow::anyhow!("cannot write {}: {}", tmp.display(), e.error()))?;
        file.seek(SeekFrom::Start(16))
            .and_then(|_| file.write_all(&len.to_le_bytes()))
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
        std::fs::rename(&tmp, &dest).with_context(|| format!("cannot rename {} into place", tmp.display()))?;
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_widths() {
        let dir = tempfile::tempdir().unwrap();
        for (width, ids) in [(2u32, vec![0u32, 1, 65535, 7]), (4, vec![0, 70000, 4_000_000_000, 3])] {
            let path = dir.path().join(format!("t{width}.bin"));
            let mut w = TokenWriter::create(&path, width, &[7; 32]).unwrap();
            w.push(&ids[..2]).unwrap();
            w.push(&ids[2..]).unwrap();
            assert_eq!(w.finish().unwrap(), 4);
            assert!(!path.with_extension("bin.tmp").exists());
            let f = TokenFile::open(&path).unwrap();
            assert_eq!(f.len(), 4);
            assert_eq!(f.tokenizer_hash, [7; 32]);
            assert_eq!((0..4).map(|i| f.get(i)).collect::<Vec<_>>(), ids);
            let mut out = vec![];
            f.extend_range(1, 2, &mut out);
            assert_eq!(out, vec![ids[1] as i64, ids[2] as i64]);
        }
    }

    #[test]
    fn verify_finds_a_changed_byte_and_ids_outside_the_vocabulary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        let mut w = TokenWriter::create(&path, 2, &[1; 32]).unwrap();
        w.push(&(0..1000).map(|i| i % 300).collect::<Vec<u32>>()).unwrap();
        w.finish().unwrap();
        let sums = TokenFile::open(&path).unwrap().chunk_checksums();
        assert!(TokenFile::open(&path).unwrap().verify(&sums, 300).is_ok());
        // A smaller vocabulary than the ids: named, with the first token outside it.
        let err = TokenFile::open(&path).unwrap().verify(&sums, 200).unwrap_err();
        assert!(err.contains("token 200 is id 200, outside the tokenizer's 200 ids"), "{err}");
        // One token changed to another valid id: the header check passes, the checksum does not.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_BYTES + 2 * 500] = 7;
        std::fs::write(&path, bytes).unwrap();
        let f = TokenFile::open(&path).unwrap();
        let err = f.verify(&sums, 300).unwrap_err();
        assert!(err.contains("bytes 0..2064 do not match their checksum"), "{err}");
    }

    /// A full disk (/dev/full answers every write with ENOSPC) is named with the file.
    #[test]
    fn a_full_disk_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        std::os::unix::fs::symlink("/dev/full", path.with_extension("bin.tmp")).unwrap();
        let mut w = TokenWriter::create(&path, 2, &[0; 32]).unwrap();
        // More than the 1 MiB buffer, so that it is written out.
        let err = (0..2).map(|_| w.push(&vec![1; 1 << 20])).find_map(Result::err).expect("a write to /dev/full fails");
        let err = format!("{err:#}");
        assert!(err.contains(&format!("cannot write {}", path.with_extension("bin.tmp").display())), "{err}");
        assert!(err.contains("No space left on device"), "{err}");
    }

    #[test]
    fn width_follows_vocab_size() {
        assert_eq!(token_width(50257), 2);
        assert_eq!(token_width(65536), 2);
        assert_eq!(token_width(65537), 4);
    }

    #[test]
    fn id_too_large_for_width_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TokenWriter::create(&dir.path().join("t.bin"), 2, &[0; 32]).unwrap();
        assert!(w.push(&[70000]).is_err());
    }

    #[test]
    fn truncated_or_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        let mut w = TokenWriter::create(&path, 2, &[0; 32]).unwrap();
        w.push(&[1, 2, 3]).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let err = TokenFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("header says 3 tokens"), "{err}");
        std::fs::write(&path, b"hello").unwrap();
        assert!(TokenFile::open(&path).err().unwrap().to_string().contains("wrong magic"));
    }
}
