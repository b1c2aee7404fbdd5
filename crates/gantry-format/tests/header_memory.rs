//! A header's memory stays close to its size whatever fields it carries: fields the spec
//! does not define are skipped, never built into a tree. Measured with a counting global
//! allocator, so this test binary holds this one test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A header of `bytes` bytes: one real tensor, each of its entries padded with a field the
/// spec does not define holding small numbers (the worst case for a JSON tree: 2 bytes of
/// text per node), and more tensors like it.
fn junk_header(bytes: usize) -> String {
    let tensors = 8;
    let per = bytes / tensors;
    let mut text = String::with_capacity(bytes + 1024);
    text.push('{');
    for t in 0..tensors {
        if t > 0 {
            text.push(',');
        }
        text += &format!(
            r#""t{t}":{{"dtype":"U8","shape":[1],"data_offsets":[{t},{}],"junk":["#,
            t + 1
        );
        let start = text.len();
        while text.len() - start < per {
            text.push_str("0,");
        }
        text += r#"0],"more":{"a":[[{}]]}}"#;
    }
    text.push('}');
    text
}

#[test]
fn junk_fields_do_not_grow_memory_past_the_header() {
    let header = junk_header(48 << 20);
    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    let parsed = gantry_format::parse_header(
        Path::new("junk.safetensors"),
        header.as_bytes(),
        8 + header.len() as u64 + 8,
    )
    .unwrap();
    assert_eq!(parsed.tensors.len(), 8);
    let peak = PEAK.load(Ordering::Relaxed) - baseline;
    // Generous: the bound is about the shape of the growth (a tree is ~16x), not its size.
    assert!(
        peak < header.len() * 4,
        "parsing a {} byte header allocated {peak} bytes at its peak",
        header.len()
    );
}
