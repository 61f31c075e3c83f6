//! What a file named as text is when it is not text, told from its first bytes: a
//! compressed file, an archive, UTF-16 or UTF-32, or binary data. Said before any of it
//! is read as text, with what to do, instead of a UTF-8 error at byte 0 and advice meant
//! for Latin-1.

use std::io::Read;
use std::path::Path;

/// How much of the start of a file is looked at.
const HEAD_BYTES: usize = 4096;

/// Compressed files and archives by their magic bytes: (magic, what it is, the command
/// that unpacks it, `{}` standing for the file).
const PACKED: [(&[u8], &str, &str); 4] = [
    (b"\x1f\x8b", "gzip-compressed", "gunzip -k {}"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "zstd -d {}"),
    (b"\xfd7zXZ\x00", "xz-compressed", "xz -dk {}"),
    (b"PK\x03\x04", "a zip archive", "unzip {}"),
];

/// Byte order marks of the UTF encodings other than UTF-8 (the 32-bit ones first: UTF-32
/// LE's starts with UTF-16 LE's), with iconv's name for each.
const MARKS: [(&[u8], &str); 4] =
    [(b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")];

/// Why a file cannot be read as UTF-8 text.
#[derive(Debug)]
pub struct NotText {
    /// What the file is and what to do, naming it.
    pub why: String,
    /// Told only by its NUL bytes: binary data of some kind (which may be a layout other
    /// than text, under an extension that does not say so).
    pub binary: bool,
}

/// Why `path` cannot be read as UTF-8 text, with what to do, from its first bytes; None
/// when it may be text. `path` must be a regular file (a FIFO would block the read).
pub fn not_text(path: &Path) -> std::io::Result<Option<NotText>> {
    let mut head = Vec::with_capacity(HEAD_BYTES);
    std::fs::File::open(path)?.take(HEAD_BYTES as u64).read_to_end(&mut head)?;
    Ok(classify(&head, &path.display().to_string()))
}

/// [`not_text`] of a file that starts with `head`, named `shown`.
fn classify(head: &[u8], shown: &str) -> Option<NotText> {
    let text = |why: String| Some(NotText { why, binary: false });
    for (magic, what, command) in PACKED {
        if head.starts_with(magic) {
            let command = command.replace("{}", shown);
            return text(format!("{shown} is {what}, not text: unpack it first ({command}) and name the text file it holds"));
        }
    }
    if is_bzip2(head) {
        return text(format!(
            "{shown} is bzip2-compressed, not text: unpack it first (bunzip2 -k {shown}) and name the text file it holds"
        ));
    }
    for (mark, encoding) in MARKS {
        if head.starts_with(mark) {
            return text(format!(
                "{shown} is {encoding} text (it starts with a {encoding} byte order mark), not UTF-8: convert it first (iconv -f {encoding} -t UTF-8 {shown} > {shown}.utf8) and name the converted file"
            ));
        }
    }
    let nuls = head.iter().filter(|&&b| b == 0).count();
    // Text has no NUL bytes; ASCII as UTF-16 has one in every other byte.
    if head.is_empty() || nuls * 8 < head.len() {
        return None;
    }
    // Nearly all of one half of the bytes NUL, hardly any of the other.
    let odd = head.iter().skip(1).step_by(2).filter(|&&b| b == 0).count();
    let even = nuls - odd;
    let pairs = head.len() / 2;
    let (most, few) = (|n: usize| n * 10 >= pairs * 9, |n: usize| n * 10 <= pairs);
    let utf16 = match (most(odd) && few(even), most(even) && few(odd)) {
        (true, _) => Some("UTF-16LE"),
        (_, true) => Some("UTF-16BE"),
        _ => None,
    };
    if let Some(encoding) = utf16 {
        return text(format!(
            "{shown} looks like {encoding} text without a byte order mark (a NUL in every other byte), not UTF-8: convert it first (iconv -f {encoding} -t UTF-8 {shown} > {shown}.utf8) and name the converted file"
        ));
    }
    let why = format!("{shown} is not text: {nuls} of its first {} bytes are NUL (a binary file?); name a UTF-8 text file", head.len());
    Some(NotText { why, binary: true })
}

/// `BZh`, a block size 1-9, then the magic of a block or of the end of the stream.
fn is_bzip2(head: &[u8]) -> bool {
    head.len() >= 10
        && head.starts_with(b"BZh")
        && (b'1'..=b'9').contains(&head[3])
        && (head[4..10] == [0x31, 0x41, 0x59, 0x26, 0x53, 0x59] || head[4..10] == [0x17, 0x72, 0x45, 0x38, 0x50, 0x90])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16(text: &str, little_endian: bool) -> Vec<u8> {
        text.encode_utf16().flat_map(|u| if little_endian { u.to_le_bytes() } else { u.to_be_bytes() }).collect()
    }

    #[test]
    fn compressed_files_archives_and_other_encodings_are_named_with_the_fix() {
        let said = |head: &[u8]| classify(head, "f.txt").map(|n| n.why).unwrap_or_default();
        assert!(said(b"\x1f\x8b\x08\x00rest").contains("f.txt is gzip-compressed, not text: unpack it first (gunzip -k f.txt)"));
        assert!(said(b"\x28\xb5\x2f\xfd...").contains("zstd -d f.txt"));
        assert!(said(b"\xfd7zXZ\x00...").contains("xz -dk f.txt"));
        assert!(said(b"PK\x03\x04...").contains("a zip archive"));
        assert!(said(b"BZh91AY&SYxxxx").contains("bunzip2 -k f.txt"));
        let le = [b"\xff\xfe".as_slice(), &utf16("some text", true)].concat();
        assert!(said(&le).contains("is UTF-16 text") && said(&le).contains("iconv -f UTF-16 -t UTF-8 f.txt"), "{}", said(&le));
        let be = [b"\xfe\xff".as_slice(), &utf16("some text", false)].concat();
        assert!(said(&be).contains("iconv -f UTF-16 -t UTF-8"));
        assert!(said(b"\xff\xfe\x00\x00h\x00\x00\x00").contains("iconv -f UTF-32"));
        assert!(said(&utf16("no mark here, plain words", true)).contains("iconv -f UTF-16LE"));
        assert!(said(&utf16("no mark here, plain words", false)).contains("iconv -f UTF-16BE"));
        assert!(said(&[0u8; 64]).contains("64 of its first 64 bytes are NUL"));
        assert!(classify(&[0u8; 64], "f").unwrap().binary && !classify(b"\x1f\x8b", "f").unwrap().binary);
    }

    #[test]
    fn text_is_text() {
        for head in
            [b"".as_slice(), b"plain words\n", "ünïcode ✓ and BZh9 alone\n".as_bytes(), b"\xef\xbb\xbfwith a UTF-8 mark", b"caf\xe9 latin1"]
        {
            assert!(classify(head, "f").is_none(), "{head:?}");
        }
    }
}
