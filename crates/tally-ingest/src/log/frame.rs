//! Record framing in segment files.
//!
//! Each record is `[u32 length][u32 crc32c][payload]`, little-endian, where the checksum covers
//! the length bytes and the payload. A frame whose length runs past the end of the file, is zero
//! or is larger than [`MAX_RECORD_BYTES`], or whose checksum does not match, marks the end of the
//! valid log: recovery cuts the file there (a torn write from a crash), and readers stop there.

/// Bytes of frame header before each payload.
pub const FRAME_HEADER_BYTES: usize = 8;

/// The largest payload a frame may carry; far above the 900 kB event limit, so a garbage length
/// in a torn tail is recognised as such.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// Appends one framed record to `out`.
pub fn write_frame(out: &mut Vec<u8>, payload: &[u8]) {
    write_frame_with(out, |out| out.extend_from_slice(payload));
}
/// Appends one framed record whose payload `encode` writes straight into `out`, so the payload
/// is not copied.
pub fn write_frame_with(out: &mut Vec<u8>, encode: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    encode(out);
    let len = ((out.len() - start - FRAME_HEADER_BYTES) as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), &out[start + FRAME_HEADER_BYTES..]);
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Reads the frame at the start of `buf`. `Some((payload, frame_len))` for a complete, intact
/// frame; `None` when `buf` ends inside the frame or the frame is invalid.
pub fn read_frame(buf: &[u8]) -> Option<(&[u8], usize)> {
    if buf.len() < FRAME_HEADER_BYTES {
        return None;
    }
    let len_bytes: [u8; 4] = buf[..4].try_into().ok()?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len == 0 || len > MAX_RECORD_BYTES || buf.len() < FRAME_HEADER_BYTES + len {
        return None;
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().ok()?);
    let payload = &buf[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len];
    if crc32c::crc32c_append(crc32c::crc32c(&len_bytes), payload) != crc {
        return None;
    }
    Some((payload, FRAME_HEADER_BYTES + len))
}

/// The length of the longest prefix of `file` made of intact frames, read in chunks.
pub fn scan_valid_len(file: &std::fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; 4 << 20];
    let mut chunk_start = 0u64;
    loop {
        let n = (len - chunk_start).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], chunk_start)?;
        let valid = valid_prefix_len(&buf[..n]);
        if valid == n && chunk_start + (n as u64) < len {
            chunk_start += n as u64;
            continue;
        }
        if valid == 0 && n == buf.len() {
            // A frame larger than the buffer: grow it and look again.
            if let Some(frame_len) = frame_len(&buf[..n]).filter(|l| *l > buf.len()) {
                buf.resize(frame_len, 0);
                continue;
            }
        }
        if valid > 0 && valid < n && n == buf.len() {
            // The chunk ended inside a frame: continue from the last whole frame.
            chunk_start += valid as u64;
            continue;
        }
        return Ok(chunk_start + valid as u64);
    }
}

/// The whole length of the frame starting `buf`, from its header, if the header is plausible.
pub(crate) fn frame_len(buf: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    (len > 0 && len <= MAX_RECORD_BYTES).then_some(FRAME_HEADER_BYTES + len)
}

/// The length of the longest prefix of `buf` made of intact frames.
pub fn valid_prefix_len(buf: &[u8]) -> usize {
    let mut at = 0;
    while let Some((_, len)) = read_frame(&buf[at..]) {
        at += len;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any cut or any flipped byte in a run of frames leaves exactly the frames before the
        /// damage.
        #[test]
        fn damage_is_detected_and_earlier_frames_survive(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..50), 1..10),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let mut buf = Vec::new();
            let mut ends = vec![0];
            for p in &payloads {
                write_frame(&mut buf, p);
                ends.push(buf.len());
            }
            prop_assert_eq!(valid_prefix_len(&buf), buf.len());

            let cut = cut.index(buf.len());
            let whole_frames_before_cut = *ends.iter().filter(|e| **e <= cut).max().unwrap();
            prop_assert_eq!(valid_prefix_len(&buf[..cut]), whole_frames_before_cut);

            let flip = flip.index(buf.len());
            let mut damaged = buf.clone();
            damaged[flip] ^= 0x5a;
            let frame_start = *ends.iter().filter(|e| **e <= flip).max().unwrap();
            prop_assert_eq!(valid_prefix_len(&damaged), frame_start);
        }
    }
}
