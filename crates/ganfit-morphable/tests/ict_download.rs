//! A user without a local ICT-FaceKit copy: the source is fetched from "upstream" (here a
//! server on 127.0.0.1 serving an archive laid out like GitHub's), converted, and the result
//! verified against the manifest.

use std::io::{Read, Write};
use std::net::TcpListener;

use ganfit_assets::{AssetSource, Resolver};
use ganfit_morphable::{ICT_ASSET_ID, IctSource};

/// Re-packs the shared `FaceXModel.tar.xz` plus `vertex_indices.json` the way GitHub's
/// repository archive holds them: gzip, under `ICT-FaceKit-<commit>/FaceXModel/`.
fn upstream_like_archive() -> Vec<u8> {
    let dir = IctSource::default()
        .locate()
        .expect("ICT-FaceKit beside the checkout");
    let xz = std::fs::File::open(dir.join("FaceXModel.tar.xz")).unwrap();
    let mut source = tar::Archive::new(xz2::read::XzDecoder::new(std::io::BufReader::new(xz)));
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut out = tar::Builder::new(gz);
    let prefix = "ICT-FaceKit-da5f95a/FaceXModel";
    for entry in source.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().file_name().unwrap().to_owned();
        let mut header = entry.header().clone();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        out.append_data(
            &mut header,
            format!("{prefix}/{}", name.to_string_lossy()),
            bytes.as_slice(),
        )
        .unwrap();
    }
    let json = std::fs::read(dir.join("vertex_indices.json")).unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_size(json.len() as u64);
    header.set_mode(0o644);
    out.append_data(
        &mut header,
        format!("{prefix}/vertex_indices.json"),
        json.as_slice(),
    )
    .unwrap();
    out.into_inner().unwrap().finish().unwrap()
}

fn serve_once(body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/ICT-FaceKit/archive/da5f95a.tar.gz",
        listener.local_addr().unwrap()
    );
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    url
}

/// A source that is not present locally, only upstream.
struct RemoteOnly(IctSource);

impl AssetSource for RemoteOnly {
    fn locate(&self) -> Result<std::path::PathBuf, Vec<ganfit_assets::SearchedPlace>> {
        Err(vec![])
    }
    fn build(
        &self,
        source: &std::path::Path,
        out: &std::path::Path,
    ) -> Result<(), ganfit_assets::BuildError> {
        self.0.build(source, out)
    }
    fn upstream(&self) -> Option<ganfit_assets::Upstream> {
        self.0.upstream()
    }
}

#[test]
fn converts_upstreams_repository_archive_into_the_manifests_model() {
    let url = serve_once(upstream_like_archive());
    let cache = tempfile::tempdir().unwrap();
    let resolver = Resolver::builder()
        .asset_dirs(vec![])
        .repo_weights(None)
        .cache_dir(Some(cache.path().to_path_buf()))
        .download(true)
        .build();
    let path = resolver
        .resolve_or_build(ICT_ASSET_ID, &RemoteOnly(IctSource::with_upstream(url)))
        .unwrap();
    assert!(path.starts_with(cache.path()));
    assert!(
        cache
            .path()
            .join("sources/ICT-FaceKit-da5f95a.tar.gz")
            .is_file()
    );
}
