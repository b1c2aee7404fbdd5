//! In-place updates (`Loader::update`): a live source or files copied into the caller's own
//! tensors, checked against the bytes the test published or wrote itself (with the
//! `safetensors` crate), never against what gantry read.

mod common;

use std::path::Path;

use gantry::live::{Server, ServerOptions};
use gantry::{Config, DeviceTarget, Dtype, HostTarget, Loader, Targets, UpdateOptions};

/// Twenty tensors of varied sizes, their bytes drawn from `seed`.
fn tensors(seed: u64) -> Vec<(String, Vec<u64>, Vec<u8>)> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..20u64)
        .map(|i| {
            let shape = vec![i % 5 + 1, 4 * (i % 3 + 1)];
            let len = (shape[0] * shape[1] * 4) as usize;
            let bytes = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            (format!("layer.{i:02}.weight"), shape, bytes)
        })
        .collect()
}

fn publish(server: &Server, tensors: &[(String, Vec<u64>, Vec<u8>)]) -> String {
    let list = tensors.iter().map(|(n, s, b)| (n.as_str(), Dtype::F32, &s[..], &b[..]));
    server.publish_tensors(list).unwrap()
}

fn url(socket: &Path) -> String {
    format!("unix://{}", socket.display())
}

/// Host targets over `params`, named and shaped like `like`.
fn host_targets<'a>(
    like: &'a [(String, Vec<u64>, Vec<u8>)],
    params: &'a mut [Vec<u8>],
) -> Targets<'a> {
    let targets = like.iter().zip(params).map(|((name, shape, _), p)| HostTarget {
        name,
        dtype: Dtype::F32,
        shape,
        bytes: p.as_mut_slice(),
    });
    Targets::Host(targets.collect())
}

#[test]
fn a_live_update_of_changed_tensors_moves_exactly_those() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    let server = Server::start(&socket, &ServerOptions::default()).unwrap();
    let v1 = tensors(1);
    publish(&server, &v1);
    let loader = Loader::new(Config::default()).unwrap();
    let mut params: Vec<Vec<u8>> = v1.iter().map(|(_, _, b)| vec![0; b.len()]).collect();
    let all = UpdateOptions::default();
    let report = loader.update(url(&socket), host_targets(&v1, &mut params), &all).unwrap();
    assert_eq!((report.moved_tensors, report.skipped_tensors), (20, 0));
    assert!(params.iter().zip(&v1).all(|(p, t)| *p == t.2), "v1 not copied whole");

    // Version 2 changes two tensors of twenty (10%); the caller also scribbled on a third.
    let mut v2 = v1.clone();
    for i in [3, 17] {
        v2[i].2.iter_mut().for_each(|b| *b = b.wrapping_add(1));
    }
    let version = publish(&server, &v2);
    params[9][0] ^= 0xff;
    let changed = UpdateOptions { changed_only: true, ..UpdateOptions::default() };
    let report = loader.update(url(&socket), host_targets(&v2, &mut params), &changed).unwrap();
    let moved: u64 = [3usize, 9, 17].iter().map(|&i| v2[i].2.len() as u64).sum();
    let total: u64 = v2.iter().map(|t| t.2.len() as u64).sum();
    assert_eq!((report.moved_tensors, report.moved_bytes), (3, moved));
    assert_eq!((report.skipped_tensors, report.skipped_bytes), (17, total - moved));
    assert_eq!(report.version.as_deref(), Some(version.as_str()));
    assert_eq!(report.load.as_ref().map(|l| l.tensor_bytes), Some(moved));
    assert!(params.iter().zip(&v2).all(|(p, t)| *p == t.2), "params differ from version 2");

    // Nothing changed: nothing moves, no load runs.
    let report = loader.update(url(&socket), host_targets(&v2, &mut params), &changed).unwrap();
    assert_eq!((report.moved_tensors, report.skipped_tensors), (0, 20));
    assert!(report.load.is_none());
    gantry::live::release(&url(&socket));
}

/// Runs an update that must fail naming `tensor`, and checks no byte of `params` moved.
fn refused(loader: &Loader, source: &str, targets: Targets<'_>, ignore_extra: bool, tensor: &str) {
    let options = UpdateOptions { ignore_extra, ..UpdateOptions::default() };
    let err = loader.update(source, targets, &options).unwrap_err().to_string();
    assert!(err.contains(&format!("'{tensor}'")) || err.contains(tensor), "{err}");
}

#[test]
fn mismatches_are_refused_before_any_byte_moves() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    let server = Server::start(&socket, &ServerOptions::default()).unwrap();
    let v1 = tensors(5);
    publish(&server, &v1);
    let source = url(&socket);
    let loader = Loader::new(Config::default()).unwrap();
    // Every target holds bytes unlike the source's; after each refusal they are unchanged.
    let mut params: Vec<Vec<u8>> = v1.iter().map(|(_, _, b)| vec![0xa5; b.len()]).collect();
    let before = params.clone();
    let last = v1.len() - 1;

    // The last tensor's shape differs (the earlier ones all fit).
    let mut like = v1.clone();
    like[last].1 = vec![like[last].1[1], like[last].1[0]];
    refused(&loader, &source, host_targets(&like, &mut params), false, &like[last].0);
    assert_eq!(params, before);

    // The last tensor's dtype differs.
    let targets = v1.iter().zip(&mut params).enumerate().map(|(i, ((n, s, _), p))| HostTarget {
        name: n,
        dtype: if i == last { Dtype::BF16 } else { Dtype::F32 },
        shape: s,
        bytes: p.as_mut_slice(),
    });
    refused(&loader, &source, Targets::Host(targets.collect()), false, &v1[last].0);
    assert_eq!(params, before);

    // A target the source does not have.
    let mut like = v1.clone();
    like[last].0 = "not.in.the.source".into();
    refused(&loader, &source, host_targets(&like, &mut params), true, "not.in.the.source");
    assert_eq!(params, before);

    // A tensor of the source without a target: an error unless the caller leaves it out.
    let (kept, _) = params.split_at_mut(last);
    refused(&loader, &source, host_targets(&v1[..last], kept), false, &v1[last].0);
    assert_eq!(params, before);

    // A buffer shorter than its tensor.
    let mut short = params.clone();
    short[last].pop();
    refused(&loader, &source, host_targets(&v1, &mut short), false, &v1[last].0);
    assert_eq!(short[..last], before[..last]);

    // The same name twice.
    let mut like = v1.clone();
    like[last].0 = like[0].0.clone();
    like[last].1 = like[0].1.clone();
    let mut twice = params.clone();
    twice[last] = vec![0xa5; v1[0].2.len()];
    refused(&loader, &source, host_targets(&like, &mut twice), true, &v1[0].0);
    assert_eq!(twice[..last], before[..last]);

    // Leaving the extra tensor out, the rest moves.
    let (kept, rest) = params.split_at_mut(last);
    let options = UpdateOptions { ignore_extra: true, ..UpdateOptions::default() };
    let report = loader.update(&source, host_targets(&v1[..last], kept), &options).unwrap();
    assert_eq!((report.moved_tensors, report.ignored_tensors), (last, 1));
    assert!(kept.iter().zip(&v1).all(|(p, t)| *p == t.2));
    assert_eq!(rest[0], before[last], "the ignored tensor moved");
    gantry::live::release(&source);
}

#[test]
fn an_update_from_files_copies_every_tensor_and_changed_only_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = tensors(9);
    let path = dir.path().join("model.safetensors");
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = v1
        .iter()
        .map(|(n, s, b)| {
            let shape = s.iter().map(|&d| d as usize).collect();
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let loader = Loader::new(Config::default()).unwrap();
    let mut params: Vec<Vec<u8>> = v1.iter().map(|(_, _, b)| vec![0; b.len()]).collect();
    let changed = UpdateOptions { changed_only: true, ..UpdateOptions::default() };
    let err = loader.update(&path, host_targets(&v1, &mut params), &changed).unwrap_err();
    assert!(err.to_string().contains("changed_only needs a live source"), "{err}");
    assert!(params.iter().all(|p| p.iter().all(|&b| b == 0)), "bytes moved before the refusal");
    let report =
        loader.update(&path, host_targets(&v1, &mut params), &UpdateOptions::default()).unwrap();
    assert_eq!((report.moved_tensors, report.version), (20, None));
    assert!(params.iter().zip(&v1).all(|(p, t)| *p == t.2), "params differ from the file");
}

/// Device targets at `buffers`, named and shaped like `like`.
fn device_targets<'a>(
    gpu: &std::sync::Arc<gantry::CudaDevice>,
    like: &'a [(String, Vec<u64>, Vec<u8>)],
    buffers: &[gantry::memory::DeviceBuffer],
) -> Targets<'a> {
    let list = like.iter().zip(buffers).map(|((name, shape, _), buffer)| DeviceTarget {
        name,
        dtype: Dtype::F32,
        shape,
        ptr: buffer.ptr(),
    });
    Targets::Device(std::sync::Arc::clone(gpu), list.collect())
}

/// GPU trial: device tensors updated in place, then only the changed ones moved.
#[test]
fn a_device_update_moves_changed_tensors_only() {
    let Some(gpu) = common::gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    let server = Server::start(&socket, &ServerOptions::default()).unwrap();
    let v1 = tensors(11);
    publish(&server, &v1);
    let buffers: Vec<_> = v1.iter().map(|(n, _, b)| gpu.alloc(b.len(), n).unwrap()).collect();
    let targets = |like| device_targets(&gpu, like, &buffers);
    let on_device = |like: &[(String, Vec<u64>, Vec<u8>)]| {
        buffers.iter().zip(like).all(|(b, t)| gpu.copy_to_host(b.ptr(), b.len()).unwrap() == t.2)
    };
    let loader = Loader::new(Config::default()).unwrap();
    let all = UpdateOptions::default();
    let report = loader.update(url(&socket), targets(&v1), &all).unwrap();
    assert_eq!(report.moved_tensors, 20);
    assert!(on_device(&v1), "version 1 differs on the device");
    let mut v2 = v1.clone();
    for i in [0, 11] {
        v2[i].2.iter_mut().for_each(|b| *b = b.wrapping_mul(3).wrapping_add(1));
    }
    publish(&server, &v2);
    let changed = UpdateOptions { changed_only: true, ..UpdateOptions::default() };
    let report = loader.update(url(&socket), targets(&v2), &changed).unwrap();
    let moved = v2[0].2.len() as u64 + v2[11].2.len() as u64;
    assert_eq!((report.moved_tensors, report.moved_bytes, report.skipped_tensors), (2, moved, 18));
    assert!(on_device(&v2), "version 2 differs on the device");
    // A wrong shape is refused before any byte moves.
    let mut bad = v1.clone();
    bad[19].1 = vec![1, 1];
    let err = loader.update(url(&socket), targets(&bad), &all).unwrap_err().to_string();
    assert!(err.contains(&v1[19].0), "{err}");
    assert!(on_device(&v2), "a refused update changed device memory");
    gantry::live::release(&url(&socket));
}
