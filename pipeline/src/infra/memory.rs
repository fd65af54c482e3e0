//! What the machine can give: memory available to a new allocation, and how freed memory is
//! kept for reuse.

/// Bytes of memory the kernel reports as available for new allocations (`MemAvailable` in
/// `/proc/meminfo`), or `None` where that is not known.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

/// The `MemAvailable:` line of a `/proc/meminfo` text, in bytes.
fn parse_mem_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => Some(value * 1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// Largest block glibc's allocator may serve from its heap instead of a fresh mapping (its
/// maximum, 32 MiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const HEAP_BLOCK_LIMIT: i32 = 32 << 20;
/// Free memory at the top of the heap that glibc keeps instead of returning it to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const KEPT_FREE_BYTES: i32 = 1 << 30;

/// Makes the allocator keep freed blocks of up to 32 MiB (activations, products, attention
/// chunks) for the next allocation instead of unmapping them: glibc's default maps every block
/// above its threshold afresh, and the kernel then faults in and zeroes each page again, which
/// took about a fifth of a full-size generation's CPU time. Peak memory is unchanged (the
/// reused pages were already counted); memory freed after the peak stays with the process.
/// Does nothing outside Linux with glibc.
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters (under the allocator's own lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT);
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEPT_FREE_BYTES);
    }
}

/// `bytes` in GiB with one decimal, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(text), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(gib(3 << 29), "1.5 GiB");
    }

    /// Minor page faults of the calling thread so far.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn page_faults() -> i64 {
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `usage` is a valid rusage for the kernel to fill.
        assert_eq!(
            unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) },
            0
        );
        usage.ru_minflt
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_blocks_are_reused_without_new_page_faults() {
        // Runs on a fresh thread of its own: its arena and fault counter see only this test.
        std::thread::spawn(|| {
            reuse_freed_memory();
            let touch = || {
                let before = page_faults();
                let block = std::hint::black_box(vec![1u8; 16 << 20]);
                drop(block);
                page_faults() - before
            };
            let first = touch();
            let second = touch();
            assert!(
                first > 1000,
                "a fresh 16 MiB block faults its pages in ({first})"
            );
            assert!(
                second < first / 4,
                "the freed block is reused ({second} of {first} faults)"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn this_machine_reports_some_memory() {
        if cfg!(target_os = "linux") {
            assert!(available_bytes().is_some_and(|b| b > 0));
        }
    }
}
