//! The resolver's search order, verification, building and concurrency, on small made-up assets.

use std::path::{Path, PathBuf};
use std::process::Command;

use ganfit_assets::{AssetError, AssetSource, BuildError, Manifest, Resolver, SearchedPlace};

const CONTENT: &[u8] = b"pretend these are model weights\n";

fn manifest_for(content: &[u8], url: Option<&str>) -> Manifest {
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe");
    std::fs::write(&probe, content).unwrap();
    let sha = ganfit_assets::sha256_file(&probe).unwrap();
    let url_line = url.map(|u| format!("url = \"{u}\"\n")).unwrap_or_default();
    let text = format!(
        "[[asset]]\nid = \"toy\"\nfile = \"toy.bin\"\nsha256 = \"{sha}\"\nbytes = {}\n\
         license = \"CC0-1.0\"\nsource = \"the test suite\"\nproduced_by = \"tests/resolver.rs\"\n\
         {url_line}",
        content.len()
    );
    Manifest::parse(&text, "test manifest").unwrap()
}

fn isolated(manifest: Manifest, cache: &Path) -> ganfit_assets::ResolverBuilder {
    Resolver::builder()
        .manifest(manifest)
        .asset_dirs(vec![])
        .repo_weights(None)
        .cache_dir(Some(cache.to_path_buf()))
        .download(false)
}

/// Builds the toy asset from a "source" folder holding `CONTENT`, slowly and in pieces, and
/// counts its builds in `builds.log` beside the source.
struct SlowSource {
    dir: PathBuf,
}

impl AssetSource for SlowSource {
    fn locate(&self) -> Result<PathBuf, Vec<SearchedPlace>> {
        let src = self.dir.join("source.txt");
        if src.is_file() {
            Ok(src)
        } else {
            Err(vec![SearchedPlace {
                kind: "toy source".into(),
                location: src.display().to_string(),
            }])
        }
    }

    fn build(&self, source: &Path, out: &Path) -> Result<(), BuildError> {
        use std::io::Write;
        let bytes = std::fs::read(source)?;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("builds.log"))?;
        writeln!(log, "build by {}", std::process::id())?;
        let mut file = std::fs::File::create(out)?;
        for chunk in bytes.chunks(4) {
            file.write_all(chunk)?;
            file.flush()?;
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }
}

#[test]
fn finds_a_verified_file_in_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    std::fs::write(cache.path().join("toy.bin"), CONTENT).unwrap();
    let resolver = isolated(manifest_for(CONTENT, None), cache.path()).build();
    assert_eq!(
        resolver.resolve("toy").unwrap(),
        cache.path().join("toy.bin")
    );
    // A second resolve uses the stamp written by the first one.
    assert!(cache.path().join("verified").read_dir().unwrap().count() >= 1);
    assert!(resolver.resolve("toy").is_ok());
}

#[test]
fn tampered_file_fails_its_checksum_and_says_how_to_fix_it() {
    let cache = tempfile::tempdir().unwrap();
    let resolver = isolated(manifest_for(CONTENT, None), cache.path()).build();
    let path = cache.path().join("toy.bin");
    std::fs::write(&path, CONTENT).unwrap();
    resolver.resolve("toy").unwrap();
    // Same length, one byte changed, a different mtime: the remembered verification must not
    // hide the change.
    let mut tampered = CONTENT.to_vec();
    tampered[3] ^= 0x20;
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&path, &tampered).unwrap();
    let err = resolver.resolve("toy").unwrap_err();
    assert!(
        matches!(err, AssetError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("toy") && msg.contains("Delete it"), "{msg}");
}

#[test]
fn truncated_file_fails_its_size_check() {
    let cache = tempfile::tempdir().unwrap();
    std::fs::write(cache.path().join("toy.bin"), &CONTENT[..10]).unwrap();
    let resolver = isolated(manifest_for(CONTENT, None), cache.path()).build();
    let err = resolver.resolve("toy").unwrap_err();
    assert!(
        matches!(err, AssetError::SizeMismatch { actual: 10, .. }),
        "{err:?}"
    );
}

#[test]
fn missing_asset_lists_every_place_searched_in_order() {
    let cache = tempfile::tempdir().unwrap();
    let extra = tempfile::tempdir().unwrap();
    let weights = tempfile::tempdir().unwrap();
    let source = SlowSource {
        dir: extra.path().join("no-source-here"),
    };
    let resolver = isolated(
        manifest_for(CONTENT, Some("https://example.invalid/toy.bin")),
        cache.path(),
    )
    .asset_dirs(vec![extra.path().to_path_buf()])
    .repo_weights(Some(weights.path().to_path_buf()))
    .build();
    let err = resolver.resolve_or_build("toy", &source).unwrap_err();
    let AssetError::NotFound { searched, .. } = &err else {
        panic!("expected NotFound, got {err:?}");
    };
    let kinds: Vec<&str> = searched.iter().map(|p| p.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "GANFIT_ASSETS",
            "repository weights/",
            "user cache",
            "toy source",
            "download (needs the `download` feature)"
        ]
    );
    let msg = err.to_string();
    let at = |needle: &Path| msg.find(&needle.display().to_string()).unwrap();
    assert!(at(extra.path()) < at(weights.path()));
    assert!(at(weights.path()) < at(cache.path()));
    assert!(msg.contains("GANFIT_ASSETS"), "{msg}");
}

#[test]
fn unknown_id_is_a_typed_error() {
    let cache = tempfile::tempdir().unwrap();
    let resolver = isolated(manifest_for(CONTENT, None), cache.path()).build();
    assert!(matches!(
        resolver.resolve("nope"),
        Err(AssetError::UnknownId { .. })
    ));
}

#[test]
fn explicit_path_wins_over_every_folder_and_is_still_verified() {
    let cache = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(cache.path().join("toy.bin"), CONTENT).unwrap();
    let mine = elsewhere.path().join("my-copy.bin");
    std::fs::write(&mine, CONTENT).unwrap();
    let manifest = manifest_for(CONTENT, None);
    let resolver = isolated(manifest.clone(), cache.path())
        .path("toy", &mine)
        .build();
    assert_eq!(resolver.resolve("toy").unwrap(), mine);

    std::fs::write(&mine, b"something else entirely").unwrap();
    let resolver = isolated(manifest, cache.path()).path("toy", &mine).build();
    assert!(
        resolver.resolve("toy").is_err(),
        "a bad explicit file must not fall back"
    );
}

#[test]
fn builds_from_source_into_the_cache_once() {
    let cache = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("source.txt"), CONTENT).unwrap();
    let source = SlowSource {
        dir: src.path().to_path_buf(),
    };
    let resolver = isolated(manifest_for(CONTENT, None), cache.path()).build();
    let path = resolver.resolve_or_build("toy", &source).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), CONTENT);
    resolver.resolve_or_build("toy", &source).unwrap();
    let builds = std::fs::read_to_string(src.path().join("builds.log")).unwrap();
    assert_eq!(builds.lines().count(), 1);
}

#[test]
fn a_build_that_does_not_match_the_manifest_leaves_nothing_behind() {
    let cache = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(
        src.path().join("source.txt"),
        b"another version of the source!!!\n",
    )
    .unwrap();
    let source = SlowSource {
        dir: src.path().to_path_buf(),
    };
    let resolver = isolated(manifest_for(CONTENT, None), cache.path()).build();
    let err = resolver.resolve_or_build("toy", &source).unwrap_err();
    assert!(matches!(err, AssetError::Build { .. }), "{err:?}");
    assert!(err.to_string().contains("manifest"), "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Child half of the process tests below; it does nothing unless a parent test launched it.
#[test]
#[ignore = "run by other tests in a child process"]
fn child_resolve() {
    let Some(cache) = std::env::var_os("GANFIT_TEST_CACHE") else {
        return;
    };
    let src = PathBuf::from(std::env::var_os("GANFIT_TEST_SOURCE").unwrap());
    let manifest = manifest_for(CONTENT, None);
    // GANFIT_ASSETS is read from the environment by the default builder.
    let resolver = Resolver::builder()
        .manifest(manifest)
        .repo_weights(None)
        .cache_dir(Some(PathBuf::from(cache)))
        .download(false)
        .build();
    let path = resolver
        .resolve_or_build("toy", &SlowSource { dir: src })
        .unwrap();
    println!("RESOLVED={}", path.display());
}

fn spawn_child(cache: &Path, source: &Path, assets: Option<&Path>) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_resolve", "--ignored", "--nocapture"])
        .env("GANFIT_TEST_CACHE", cache)
        .env("GANFIT_TEST_SOURCE", source)
        .env_remove("GANFIT_ASSETS")
        .stdout(std::process::Stdio::piped());
    if let Some(dir) = assets {
        cmd.env("GANFIT_ASSETS", dir);
    }
    cmd.spawn().unwrap()
}

fn resolved_path(child: std::process::Child) -> PathBuf {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "child failed: {out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESOLVED="))
        .unwrap_or_else(|| panic!("no RESOLVED line in {stdout}"));
    PathBuf::from(line)
}

#[test]
fn ganfit_assets_environment_variable_wins_over_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let assets = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(cache.path().join("toy.bin"), CONTENT).unwrap();
    std::fs::write(assets.path().join("toy.bin"), CONTENT).unwrap();
    let with_env = resolved_path(spawn_child(cache.path(), src.path(), Some(assets.path())));
    assert_eq!(with_env, assets.path().join("toy.bin"));
    let without = resolved_path(spawn_child(cache.path(), src.path(), None));
    assert_eq!(without, cache.path().join("toy.bin"));
}

#[test]
fn two_processes_building_at_once_leave_one_valid_file() {
    let cache = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("source.txt"), CONTENT).unwrap();
    let a = spawn_child(cache.path(), src.path(), None);
    let b = spawn_child(cache.path(), src.path(), None);
    let (pa, pb) = (resolved_path(a), resolved_path(b));
    assert_eq!(pa, pb);
    assert_eq!(std::fs::read(&pa).unwrap(), CONTENT);
    let builds = std::fs::read_to_string(src.path().join("builds.log")).unwrap();
    assert_eq!(builds.lines().count(), 1, "built twice:\n{builds}");
    let stray: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[cfg(feature = "download")]
mod download {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// Serves `body` once over HTTP on 127.0.0.1 and returns the URL.
    fn serve_once(body: &'static [u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let mut request = [0u8; 2048];
                let _ = stream.read(&mut request);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            }
        });
        format!("http://{addr}/toy.bin")
    }

    /// A source that is never present locally and must be fetched from `url`.
    struct RemoteSource {
        url: String,
    }

    impl AssetSource for RemoteSource {
        fn locate(&self) -> Result<PathBuf, Vec<SearchedPlace>> {
            Err(vec![])
        }

        fn build(&self, source: &Path, out: &Path) -> Result<(), BuildError> {
            // The "conversion": the source is the asset upper-cased.
            let text = std::fs::read_to_string(source)?;
            std::fs::write(out, text.to_uppercase())?;
            Ok(())
        }

        fn upstream(&self) -> Option<ganfit_assets::Upstream> {
            Some(ganfit_assets::Upstream {
                url: self.url.clone(),
                file_name: "toy-source.txt".into(),
            })
        }
    }

    #[test]
    fn fetches_a_missing_source_then_builds_from_it() {
        let cache = tempfile::tempdir().unwrap();
        let source = RemoteSource {
            url: serve_once(b"pretend these are model weights\n"),
        };
        let upper = CONTENT.to_ascii_uppercase();
        let resolver = isolated(manifest_for(&upper, None), cache.path())
            .download(true)
            .build();
        let path = resolver.resolve_or_build("toy", &source).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), upper);
        assert!(cache.path().join("sources/toy-source.txt").is_file());

        let offline = isolated(
            manifest_for(&upper, None),
            tempfile::tempdir().unwrap().path(),
        )
        .download(false)
        .build();
        let err = offline.resolve_or_build("toy", &source).unwrap_err();
        assert!(
            err.to_string()
                .contains("source download (needs the `download` feature)"),
            "{err}"
        );
    }

    #[test]
    fn downloads_verifies_and_caches() {
        let cache = tempfile::tempdir().unwrap();
        let url = serve_once(CONTENT);
        let resolver = isolated(manifest_for(CONTENT, Some(&url)), cache.path())
            .download(true)
            .build();
        let path = resolver.resolve("toy").unwrap();
        assert_eq!(path, cache.path().join("toy.bin"));
        assert_eq!(std::fs::read(&path).unwrap(), CONTENT);
        // The server is gone now: the second resolve must come from the cache.
        assert_eq!(resolver.resolve("toy").unwrap(), path);
    }

    #[test]
    fn a_tampered_download_is_rejected_and_not_kept() {
        let cache = tempfile::tempdir().unwrap();
        let url = serve_once(b"pretend these are model weightz\n");
        let resolver = isolated(manifest_for(CONTENT, Some(&url)), cache.path())
            .download(true)
            .build();
        let err = resolver.resolve("toy").unwrap_err();
        assert!(
            matches!(err, AssetError::ChecksumMismatch { .. }),
            "{err:?}"
        );
        assert!(!cache.path().join("toy.bin").exists());
    }

    #[test]
    fn file_urls_work_and_a_dead_server_is_a_download_error() {
        let cache = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        let file = src.path().join("toy.bin");
        std::fs::write(&file, CONTENT).unwrap();
        let url = format!("file://{}", file.display());
        let resolver = isolated(manifest_for(CONTENT, Some(&url)), cache.path())
            .download(true)
            .build();
        assert!(resolver.resolve("toy").is_ok());

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = format!("http://{}/toy.bin", listener.local_addr().unwrap());
        drop(listener);
        let cache = tempfile::tempdir().unwrap();
        let resolver = isolated(manifest_for(CONTENT, Some(&dead)), cache.path())
            .download(true)
            .build();
        let err = resolver.resolve("toy").unwrap_err();
        assert!(matches!(err, AssetError::Download { .. }), "{err:?}");
    }
}
