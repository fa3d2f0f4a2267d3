//! Decoder throughput, beside a plain copy of the same bytes in the same run.
//!
//! Run with: `cargo bench -p schema --bench decode`
//!
//! The stream looks like the module's: one block per flush, each holding one
//! MetricList per container with container tags and ~30 statistics.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use schema::ocf::BlockView;
use schema::{Codec, Datapoint, Limits, MetricList, OcfEncoder, StreamDecoder, Tag};

// The same allocator the collector and simulator binaries use.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Reads block by block with `step` (which answers the bytes it used and
/// the block's datapoints, `None` at the end), dropping each block after
/// counting it, the way a collector connection does. Returns the
/// datapoint count.
fn count_blocks(
    bytes: &[u8],
    mut step: impl FnMut(&mut StreamDecoder, &[u8]) -> (usize, Option<usize>),
) -> usize {
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut rest = bytes;
    let mut datapoints = 0;
    loop {
        let (used, block) = step(&mut decoder, rest);
        rest = &rest[used..];
        match block {
            Some(n) => datapoints += n,
            None => return datapoints,
        }
    }
}

/// Decodes every record into owned values.
fn decode_blocks(bytes: &[u8]) -> usize {
    count_blocks(bytes, |decoder, rest| {
        let (used, block) = decoder
            .decode_slice(rest)
            .expect("the bench stream is valid");
        (used, block.map(|block| black_box(block).datapoints()))
    })
}

/// Validates the records in place, as the collector's connections do
/// (`StreamDecoder::decode_view`).
fn scan_blocks(bytes: &[u8]) -> usize {
    count_blocks(bytes, |decoder, rest| {
        let (used, block) = decoder
            .decode_view(rest)
            .expect("the bench stream is valid");
        let datapoints = block.map(|block| match black_box(block) {
            BlockView::Raw(raw) => raw.records.iter().map(|r| r.datapoints() as usize).sum(),
            BlockView::Decoded(block) => block.datapoints(),
        });
        (used, datapoints)
    })
}

const STATS: [&str; 10] = [
    "cpus_user_time_secs",
    "cpus_system_time_secs",
    "cpus_limit",
    "mem_rss_bytes",
    "mem_limit_bytes",
    "mem_cache_bytes",
    "net_rx_bytes",
    "net_tx_bytes",
    "disk_used_bytes",
    "cpus_nr_throttled",
];

fn container(i: usize) -> MetricList {
    let framework = format!("5349f49b-68b3-4638-aab2-fc4ec845f993-{:04}", i % 7);
    MetricList {
        topic: framework.clone(),
        tags: vec![
            Tag::new("framework_id", framework),
            Tag::new(
                "executor_id",
                format!("metrics-collector.{i:08x}-1dd2-11b2-8d0d-0242ac110002"),
            ),
            Tag::new("container_id", format!("c7b0ab1f-5e4a-4a0e-9f8d-{i:012x}")),
        ],
        datapoints: (0..30)
            .map(|j| {
                Datapoint::new(
                    format!("usage.{}", STATS[j % STATS.len()]),
                    1_464_000_000_000 + j as i64,
                    (i * j) as f64 * 0.37,
                )
            })
            .collect(),
    }
}

fn stream(codec: Codec) -> Vec<u8> {
    let mut encoder = OcfEncoder::new(codec);
    let mut out = Vec::new();
    encoder.write_header(&mut out);
    for block in 0..2_000 {
        let records: Vec<MetricList> = (0..10).map(|i| container(block * 10 + i)).collect();
        encoder.write_block(&records, &mut out);
    }
    out
}

fn bench(c: &mut Criterion) {
    let null = stream(Codec::Null);
    let mut group = c.benchmark_group("ocf");
    group.throughput(Throughput::Bytes(null.len() as u64));
    group.bench_function("plain_copy", |b| {
        let mut dst = vec![0u8; null.len()];
        b.iter(|| {
            dst.copy_from_slice(black_box(&null));
            black_box(&dst);
        })
    });
    group.bench_function("decode_null", |b| {
        b.iter(|| decode_blocks(black_box(&null)))
    });
    group.bench_function("scan_null", |b| b.iter(|| scan_blocks(black_box(&null))));
    for codec in [Codec::Snappy, Codec::Deflate] {
        let packed = stream(codec);
        // Throughput is counted in *uncompressed* bytes, like the null case.
        group.bench_function(format!("decode_{codec}"), |b| {
            b.iter(|| decode_blocks(black_box(&packed)))
        });
    }
    let records: Vec<MetricList> = (0..10).map(container).collect();
    group.bench_function("encode_null", |b| {
        let mut encoder = OcfEncoder::new(Codec::Null);
        let mut out = Vec::with_capacity(null.len());
        b.iter(|| {
            out.clear();
            for _ in 0..2_000 {
                encoder.write_block(black_box(&records), &mut out);
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
