//! A snapshot's guest RAM, stored compactly: only the pages that are not all zero.
//!
//! Guest RAM lives in a memfd that pen creates and QEMU maps shared (virtio-fs needs shared
//! RAM). At the snapshot point the guest has touched a tenth of it; the rest reads as zero.
//! Saving copies the non-zero pages out of the memfd; restoring copies them into a fresh
//! memfd, so a restored VM holds only those pages and never reads the untouched rest. The
//! format does not depend on the filesystem keeping holes (a copied snapshot stays small).
//!
//! Layout: `[pages of every run, in order][index][trailer]`; the index is one
//! `(first page, page count)` pair of little-endian u64 per run, the trailer is
//! [`Trailer::LEN`] bytes. The whole file's xxh3-64 is recorded in the manifest and checked
//! while restoring, as the file is read anyway.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

pub const PAGE: u64 = 4096;
const MAGIC: &[u8; 8] = b"PENRAM01";
/// Bytes moved per read or write while copying.
const CHUNK: usize = 4 << 20;

/// What the manifest records about the RAM file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamCheck {
    pub file_size: u64,
    pub data_pages: u64,
    /// xxh3-64 of the whole file, hex.
    pub xxh3: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    first: u64,
    pages: u64,
}

/// The fixed-size end of the file, which says where the index starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Trailer {
    ram_size: u64,
    runs: u64,
    data_pages: u64,
}

impl Trailer {
    const LEN: u64 = 8 + 4 * 8;

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::LEN as usize);
        b.extend_from_slice(MAGIC);
        for v in [PAGE, self.ram_size, self.runs, self.data_pages] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Result<Trailer, String> {
        if b.len() != Self::LEN as usize || &b[..8] != MAGIC {
            return Err("the RAM image has no valid trailer".into());
        }
        let field = |i: usize| u64::from_le_bytes(b[8 + i * 8..16 + i * 8].try_into().unwrap());
        if field(0) != PAGE {
            return Err(format!("the RAM image uses {}-byte pages", field(0)));
        }
        Ok(Trailer {
            ram_size: field(1),
            runs: field(2),
            data_pages: field(3),
        })
    }
}

/// Writes the non-zero pages of `ram` (`ram_size` bytes) to `out`; returns the check for
/// the manifest. Only the memfd's allocated regions are read (SEEK_DATA): pages the guest
/// never touched cost nothing.
pub fn save(ram: &File, ram_size: u64, out: &File) -> io::Result<RamCheck> {
    let mut writer = HashingWriter::new(io::BufWriter::with_capacity(CHUNK, out));
    let mut runs: Vec<Run> = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    for (start, end) in data_regions(ram, ram_size)? {
        let mut at = start;
        while at < end {
            let len = ((end - at) as usize).min(CHUNK);
            ram.read_exact_at(&mut buf[..len], at)?;
            for (i, page) in buf[..len].chunks(PAGE as usize).enumerate() {
                if is_zero(page) {
                    continue;
                }
                let index = at / PAGE + i as u64;
                match runs.last_mut() {
                    Some(run) if run.first + run.pages == index => run.pages += 1,
                    _ => runs.push(Run {
                        first: index,
                        pages: 1,
                    }),
                }
                writer.write_all(page)?;
            }
            at += len as u64;
        }
    }
    let data_pages = runs.iter().map(|r| r.pages).sum();
    for run in &runs {
        writer.write_all(&run.first.to_le_bytes())?;
        writer.write_all(&run.pages.to_le_bytes())?;
    }
    writer.write_all(
        &Trailer {
            ram_size,
            runs: runs.len() as u64,
            data_pages,
        }
        .encode(),
    )?;
    let (inner, hash, written) = writer.finish();
    inner.into_inner().map_err(|e| e.into_error())?;
    Ok(RamCheck {
        file_size: written,
        data_pages,
        xxh3: format!("{hash:016x}"),
    })
}

/// Copies the RAM image `file` into `ram` (a fresh, zero memfd of `ram_size` bytes),
/// checking its structure against `check` and its checksum as it goes. An error means the
/// image is damaged or does not fit this VM; `ram` is then partly written and must be
/// discarded.
pub fn load(file: &File, check: &RamCheck, ram: &File, ram_size: u64) -> Result<(), String> {
    let io = |e: io::Error| format!("reading the RAM image: {e}");
    let len = file.metadata().map_err(io)?.len();
    if len != check.file_size {
        return Err(format!(
            "the RAM image is {len} bytes, the manifest says {}",
            check.file_size
        ));
    }
    let (trailer, index) = read_index(file, len)?;
    if trailer.ram_size != ram_size {
        return Err(format!(
            "the RAM image holds {} bytes of RAM, the VM has {ram_size}",
            trailer.ram_size
        ));
    }
    if trailer.data_pages != check.data_pages {
        return Err("the RAM image's page count does not match the manifest".into());
    }
    let runs = parse_runs(&index, &trailer)?;

    // The file is mapped, not read into a buffer: the pages go from the page cache straight
    // into the memfd, one copy instead of two. This copy is the longest part of a restore's
    // host work, and most of it is the kernel allocating and zeroing memfd pages, so two
    // threads share it: one hashes the whole file and writes the first half of the pages,
    // the other writes the second half.
    // SAFETY: snapshot files are written once and renamed into place, never modified; a
    // file truncated under us would fault, and nothing else maps it.
    let map = unsafe { memmap2::Mmap::map(file) }.map_err(io)?;
    let _ = map.advise(memmap2::Advice::Sequential);
    let data = &map[..(trailer.data_pages * PAGE) as usize];
    let (first, second) = split_runs(&runs, trailer.data_pages / 2);
    let write_runs = |runs: &[PlacedRun]| -> Result<(), String> {
        for &(run, at) in runs {
            let bytes = &data[at..at + (run.pages * PAGE) as usize];
            ram.write_all_at(bytes, run.first * PAGE)
                .map_err(|e| format!("writing guest RAM: {e}"))?;
        }
        Ok(())
    };
    let mut hasher = Xxh3::new();
    std::thread::scope(|scope| {
        let helper = scope.spawn(|| write_runs(&second));
        for chunk in data.chunks(CHUNK) {
            hasher.update(chunk);
        }
        let mine = write_runs(&first);
        let theirs = helper
            .join()
            .unwrap_or_else(|_| Err("the RAM copy thread panicked".into()));
        mine.and(theirs)
    })?;
    hasher.update(&index);
    hasher.update(&trailer.encode());
    let hash = format!("{:016x}", hasher.digest());
    if hash != check.xxh3 {
        return Err("the RAM image's checksum does not match".into());
    }
    Ok(())
}

/// A run of pages and the offset of its pages in the RAM image.
type PlacedRun = (Run, usize);

/// Splits `runs` into two lists of placed runs, the first holding about `pages` pages; a run
/// that straddles the split is cut in two.
fn split_runs(runs: &[Run], pages: u64) -> (Vec<PlacedRun>, Vec<PlacedRun>) {
    let (mut first, mut second) = (Vec::new(), Vec::new());
    let mut at = 0u64;
    for &run in runs {
        let taken = pages.saturating_sub(at / PAGE).min(run.pages);
        if taken > 0 {
            first.push((
                Run {
                    first: run.first,
                    pages: taken,
                },
                at as usize,
            ));
        }
        if taken < run.pages {
            second.push((
                Run {
                    first: run.first + taken,
                    pages: run.pages - taken,
                },
                (at + taken * PAGE) as usize,
            ));
        }
        at += run.pages * PAGE;
    }
    (first, second)
}

/// Reads the trailer and the index at the end of a file of `len` bytes.
fn read_index(file: &File, len: u64) -> Result<(Trailer, Vec<u8>), String> {
    if len < Trailer::LEN {
        return Err("the RAM image is truncated".into());
    }
    let mut tail = vec![0u8; Trailer::LEN as usize];
    file.read_exact_at(&mut tail, len - Trailer::LEN)
        .map_err(|e| format!("reading the RAM image: {e}"))?;
    let trailer = Trailer::decode(&tail)?;
    let index_len = trailer
        .runs
        .checked_mul(16)
        .ok_or("the RAM image's index is impossibly large")?;
    let expected = trailer
        .data_pages
        .checked_mul(PAGE)
        .and_then(|d| d.checked_add(index_len))
        .and_then(|d| d.checked_add(Trailer::LEN));
    if expected != Some(len) {
        return Err("the RAM image's size does not match its index (truncated?)".into());
    }
    let mut index = vec![0u8; index_len as usize];
    file.read_exact_at(&mut index, len - Trailer::LEN - index_len)
        .map_err(|e| format!("reading the RAM image: {e}"))?;
    Ok((trailer, index))
}

/// Decodes the index: runs in ascending order, not overlapping, inside the RAM, adding up
/// to the trailer's page count.
fn parse_runs(index: &[u8], trailer: &Trailer) -> Result<Vec<Run>, String> {
    let total_pages = trailer.ram_size / PAGE;
    let mut runs = Vec::with_capacity(index.len() / 16);
    let mut next_free = 0u64;
    let mut pages = 0u64;
    for pair in index.chunks_exact(16) {
        let first = u64::from_le_bytes(pair[..8].try_into().unwrap());
        let count = u64::from_le_bytes(pair[8..].try_into().unwrap());
        let end = match first.checked_add(count) {
            Some(end) if count > 0 && first >= next_free && end <= total_pages => end,
            _ => return Err("the RAM image's index is damaged".into()),
        };
        next_free = end;
        pages += count;
        runs.push(Run {
            first,
            pages: count,
        });
    }
    if pages != trailer.data_pages {
        return Err("the RAM image's index is damaged".into());
    }
    Ok(runs)
}

/// The allocated regions of `file` within `[0, size)`, page aligned.
fn data_regions(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let fd = file.as_raw_fd();
    let mut regions = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        let start = match lseek(fd, pos, Whence::SeekData) {
            Ok(s) => s,
            // ENXIO: no data after `pos`.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = lseek(fd, start, Whence::SeekHole)?.min(size as i64);
        let start = start as u64 / PAGE * PAGE;
        let end = (end as u64).div_ceil(PAGE) * PAGE;
        regions.push((start, end.min(size)));
        pos = end as i64;
    }
    Ok(regions)
}

fn is_zero(page: &[u8]) -> bool {
    // Word-wise: this runs over every touched page of guest RAM on each save.
    // SAFETY: every bit pattern is a valid u128; align_to handles the alignment.
    let (head, words, tail) = unsafe { page.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// A writer that hashes and counts what passes through.
struct HashingWriter<W> {
    inner: W,
    hasher: Xxh3,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Xxh3::new(),
            written: 0,
        }
    }

    fn finish(self) -> (W, u64, u64) {
        (self.inner, self.hasher.digest(), self.written)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_runs_cuts_at_the_page_count_and_keeps_file_offsets() {
        let run = |first, pages| Run { first, pages };
        let runs = [run(0, 2), run(10, 4), run(20, 1)];
        let (a, b) = split_runs(&runs, 4);
        let p = PAGE as usize;
        assert_eq!(a, vec![(run(0, 2), 0), (run(10, 2), 2 * p)]);
        assert_eq!(b, vec![(run(12, 2), 4 * p), (run(20, 1), 6 * p)]);
        let (all, none) = split_runs(&runs, 100);
        assert_eq!(all.len(), 3);
        assert!(none.is_empty());
        let (none, all) = split_runs(&runs, 0);
        assert!(none.is_empty());
        assert_eq!(all[2], (run(20, 1), 6 * p));
    }

    const RAM: u64 = 64 * PAGE;

    /// A sparse "RAM" with a few non-zero pages and an allocated but zero page.
    fn ram_with_pages(pages: &[(u64, u8)]) -> File {
        let ram = tempfile::tempfile().unwrap();
        ram.set_len(RAM).unwrap();
        for &(page, byte) in pages {
            ram.write_all_at(&vec![byte; PAGE as usize], page * PAGE)
                .unwrap();
        }
        ram
    }

    fn read_all(f: &File, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    fn saved(pages: &[(u64, u8)]) -> (File, File, RamCheck) {
        let ram = ram_with_pages(pages);
        let out = tempfile::tempfile().unwrap();
        let check = save(&ram, RAM, &out).unwrap();
        (ram, out, check)
    }

    #[test]
    fn roundtrip_keeps_only_nonzero_pages() {
        let (ram, out, check) = saved(&[(0, 1), (1, 2), (2, 0), (10, 3), (63, 4)]);
        assert_eq!(check.data_pages, 4);
        assert_eq!(check.file_size, 4 * PAGE + 3 * 16 + Trailer::LEN);
        assert_eq!(out.metadata().unwrap().len(), check.file_size);

        let restored = tempfile::tempfile().unwrap();
        restored.set_len(RAM).unwrap();
        load(&out, &check, &restored, RAM).unwrap();
        assert_eq!(read_all(&restored, RAM), read_all(&ram, RAM));
    }

    #[test]
    fn empty_ram_saves_an_empty_image() {
        let (_ram, out, check) = saved(&[]);
        assert_eq!(check.data_pages, 0);
        let restored = tempfile::tempfile().unwrap();
        restored.set_len(RAM).unwrap();
        load(&out, &check, &restored, RAM).unwrap();
    }

    fn load_err(out: &File, check: &RamCheck, ram_size: u64) -> String {
        let restored = tempfile::tempfile().unwrap();
        restored.set_len(ram_size).unwrap();
        load(out, check, &restored, ram_size).unwrap_err()
    }

    #[test]
    fn flipped_byte_is_caught_by_the_checksum() {
        let (_ram, out, check) = saved(&[(3, 7), (4, 8)]);
        out.write_all_at(&[0xff], PAGE + 17).unwrap();
        assert_eq!(
            load_err(&out, &check, RAM),
            "the RAM image's checksum does not match"
        );
    }

    #[test]
    fn truncation_is_caught_before_copying() {
        let (_ram, out, check) = saved(&[(3, 7), (4, 8)]);
        out.set_len(check.file_size - 100).unwrap();
        let err = load_err(&out, &check, RAM);
        assert!(err.contains("manifest says"), "{err}");
        // Even with a manifest that agrees with the short file.
        let short = RamCheck {
            file_size: check.file_size - 100,
            ..check
        };
        let err = load_err(&out, &short, RAM);
        assert!(err.contains("trailer"), "{err}");
    }

    #[test]
    fn wrong_ram_size_is_refused() {
        let (_ram, out, check) = saved(&[(3, 7)]);
        let err = load_err(&out, &check, RAM * 2);
        assert!(err.contains("the VM has"), "{err}");
    }

    #[test]
    fn damaged_index_is_refused() {
        let (_ram, out, check) = saved(&[(3, 7), (9, 8)]);
        // Make the second run start inside the first.
        let index_at = 2 * PAGE;
        out.write_all_at(&3u64.to_le_bytes(), index_at + 16)
            .unwrap();
        let err = load_err(&out, &check, RAM);
        assert!(err.contains("index is damaged"), "{err}");
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        let mut p = [0u8; 4096];
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[0] = 1;
        assert!(!is_zero(&p));
    }
}
