//! The first run of a new user, without the network: the default model and `hub:` models come
//! from a local fake of the Hugging Face hub (the real sd-turbo file list, tiny contents) into a
//! temporary hub cache; offline mode, resumed downloads, tokens and single-file repos; and the
//! examples' error output.

#[path = "support/fake_hub.rs"]
mod fake_hub;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fake_hub::{FakeHub, FakeRepo, SD_TURBO_NEEDED};
use sd_models::hub::{download, HubModel, HubOptions};
use sd_models::loader::{load, read_folder_config, LoadOptions};
use sd_models::SdVariant;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-first-run-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn options(hub: &FakeHub, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: hub.endpoint(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline: false,
        progress: false,
        prefer_fp16: true,
    }
}

/// An endpoint where nothing listens (a port just released).
fn dead_endpoint() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
    format!("http://127.0.0.1:{port}")
}

#[test]
fn the_default_model_downloads_only_its_fp16_pipeline_files_into_the_hub_cache_layout() {
    let hub = FakeHub::start(vec![fake_hub::sd_turbo_repo()]);
    let cache = temp_dir("default");
    let model = HubModel::default_model();
    let dir = download(&model, &options(&hub, &cache)).expect("download");
    let snapshot = cache.join("models--stabilityai--sd-turbo/snapshots").join(fake_hub::SD_TURBO_COMMIT);
    assert_eq!(dir, snapshot);
    assert_eq!(std::fs::read_to_string(cache.join("models--stabilityai--sd-turbo/refs/main")).expect("ref"), fake_hub::SD_TURBO_COMMIT);
    assert_eq!(hub.downloaded("stabilityai/sd-turbo"), SD_TURBO_NEEDED.to_vec(), "not the 5 GB single file, fp32 weights or README images");
    for f in SD_TURBO_NEEDED {
        let p = snapshot.join(f);
        assert!(p.is_file(), "{f}");
        // Snapshot entries point at content-addressed blobs, as huggingface_hub lays them out.
        if cfg!(unix) {
            let target = std::fs::read_link(&p).expect("symlink");
            assert!(target.to_string_lossy().contains("blobs/"), "{}", target.display());
        }
    }
    // The snapshot folder is named by a commit, yet the repo name still selects the turbo variant.
    let models = load(&dir, &LoadOptions::default()).expect("load the snapshot");
    assert_eq!(models.config.variant, SdVariant::SdTurbo);

    // A second run asks the hub for the file list only: every file is already cached.
    let before = hub.seen().len();
    assert_eq!(download(&model, &options(&hub, &cache)).expect("again"), dir);
    let again: Vec<String> = hub.seen()[before..].iter().map(|s| s.path.clone()).collect();
    assert_eq!(again, vec!["/api/models/stabilityai/sd-turbo/revision/main".to_string()]);

    // f32 weights when asked for them.
    let cache32 = temp_dir("default-f32");
    let mut o = options(&hub, &cache32);
    o.prefer_fp16 = false;
    let hub_files = hub.seen().len();
    download(&model, &o).expect("f32 download");
    let fetched: Vec<String> = hub.seen()[hub_files..].iter().filter(|s| s.range.as_deref() != Some("bytes=0-0")).map(|s| s.path.clone()).collect();
    assert!(fetched.iter().any(|p| p.ends_with("unet/diffusion_pytorch_model.safetensors")), "{fetched:?}");
    assert!(!fetched.iter().any(|p| p.contains(".fp16.")), "{fetched:?}");
}

#[test]
fn offline_mode_and_a_lost_connection_use_the_cache_without_any_request() {
    let hub = FakeHub::start(vec![fake_hub::sd_turbo_repo()]);
    let cache = temp_dir("offline");
    let model = HubModel::default_model();
    let dir = download(&model, &options(&hub, &cache)).expect("download");
    let before = hub.seen().len();

    let mut offline = options(&hub, &cache);
    offline.offline = true;
    assert_eq!(download(&model, &offline).expect("offline"), dir);
    assert_eq!(hub.seen().len(), before, "offline mode makes no request");

    // No hub reachable and not offline: the complete cached snapshot is used.
    let mut unreachable = options(&hub, &cache);
    unreachable.endpoint = dead_endpoint();
    assert_eq!(download(&model, &unreachable).expect("fallback to the cache"), dir);

    // Offline with nothing cached: a sentence that says what to do.
    let mut empty = offline.clone();
    empty.cache_dir = temp_dir("offline-empty");
    let e = download(&model, &empty).expect_err("nothing cached").to_string();
    assert!(e.contains("not in the hub cache") && e.contains("HF_HUB_OFFLINE"), "{e}");
    // Unreachable with nothing cached.
    let mut nothing = unreachable.clone();
    nothing.cache_dir = temp_dir("unreachable-empty");
    let e = download(&model, &nothing).expect_err("nothing cached").to_string();
    assert!(e.contains("cannot reach") && e.contains("not in the hub cache"), "{e}");

    // Offline with weights missing from the snapshot: the folder is named, with what to do.
    std::fs::remove_file(dir.join("vae/diffusion_pytorch_model.fp16.safetensors")).expect("remove");
    let e = download(&model, &offline).expect_err("incomplete").to_string();
    assert!(e.contains("vae/ has no weights in the cached snapshot") && e.contains("HF_HUB_OFFLINE"), "{e}");
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    let repo = fake_hub::sd_turbo_repo();
    let unet = repo.files["unet/diffusion_pytorch_model.fp16.safetensors"].clone();
    let hub = FakeHub::start(vec![repo]);
    let cache = temp_dir("resume");
    let blobs = cache.join("models--stabilityai--sd-turbo/blobs");
    std::fs::create_dir_all(&blobs).expect("blobs");
    let half = unet.len() / 2;
    std::fs::write(blobs.join(format!("{}.part", fake_hub::etag(&unet))), &unet[..half]).expect("partial file");
    let dir = download(&HubModel::default_model(), &options(&hub, &cache)).expect("download");
    let range = format!("bytes={half}-");
    assert!(
        hub.seen().iter().any(|s| s.path.ends_with("unet/diffusion_pytorch_model.fp16.safetensors") && s.range.as_deref() == Some(range.as_str())),
        "the download continued from byte {half}: {:?}",
        hub.seen().iter().map(|s| (&s.path, &s.range)).collect::<Vec<_>>()
    );
    assert_eq!(std::fs::read(dir.join("unet/diffusion_pytorch_model.fp16.safetensors")).expect("read"), unet);
}

fn single_file_repo(id: &str, files: &[&str]) -> FakeRepo {
    let bytes = std::fs::read(fake_hub::fixtures().join("sd15.safetensors")).expect("fixture");
    let mut map: BTreeMap<String, Vec<u8>> = files.iter().map(|f| (f.to_string(), bytes.clone())).collect();
    map.insert("README.md".into(), b"# a civitai mirror\n".to_vec());
    FakeRepo { id: id.into(), commit: "0123456789abcdef0123456789abcdef01234567".into(), files: map, token: None }
}

#[test]
fn single_file_repos_load_their_one_checkpoint_or_the_named_one() {
    let hub = FakeHub::start(vec![
        single_file_repo("someone/one-file", &["dreamy_v2.safetensors"]),
        single_file_repo("someone/two-files", &["dreamy_v2.safetensors", "dreamy_v2-inpainting.safetensors"]),
    ]);
    let cache = temp_dir("single");
    let o = options(&hub, &cache);
    let path = download(&HubModel::parse("hub:someone/one-file").expect("spec"), &o).expect("one file");
    assert!(path.ends_with("dreamy_v2.safetensors") && path.is_file(), "{}", path.display());
    assert_eq!(hub.downloaded("someone/one-file"), vec!["dreamy_v2.safetensors".to_string()]);
    // A tiny checkpoint needs its configs (as diffusers' `from_single_file(config=…)`).
    let config = read_folder_config(&fake_hub::fixtures().join("sd15"), None).expect("config");
    let models = load(&path, &LoadOptions { config: Some(config), ..LoadOptions::default() }).expect("the single file loads");
    assert_eq!(models.config.variant, SdVariant::V1_5);

    let e = download(&HubModel::parse("hub:someone/two-files").expect("spec"), &o).expect_err("ambiguous").to_string();
    assert!(e.contains("dreamy_v2-inpainting.safetensors") && e.contains("hub:someone/two-files/"), "{e}");
    let named = HubModel::parse("hub:someone/two-files/dreamy_v2.safetensors@main").expect("spec");
    let path = download(&named, &o).expect("named file");
    assert!(path.ends_with("dreamy_v2.safetensors"));
    let e = download(&HubModel::parse("hub:someone/two-files/nope.safetensors").expect("spec"), &o).expect_err("missing").to_string();
    assert!(e.contains("no file nope.safetensors") && e.contains("dreamy_v2.safetensors"), "{e}");
    let e = download(&HubModel::parse("hub:someone/absent").expect("spec"), &o).expect_err("404").to_string();
    assert!(e.contains("404"), "{e}");
}

#[test]
fn gated_repos_need_the_token_and_get_it() {
    let mut repo = single_file_repo("org/gated", &["model.safetensors"]);
    repo.token = Some("hf_secret".into());
    let hub = FakeHub::start(vec![repo]);
    let cache = temp_dir("gated");
    let model = HubModel::parse("hub:org/gated").expect("spec");
    let e = download(&model, &options(&hub, &cache)).expect_err("no token").to_string();
    assert!(e.contains("HF_TOKEN"), "{e}");
    let mut o = options(&hub, &cache);
    o.token = Some("hf_secret".into());
    download(&model, &o).expect("with the token");
    assert!(hub.seen().iter().any(|s| s.authorization.as_deref() == Some("Bearer hf_secret")));
}

/// A built example binary (`cargo test` builds the examples beside the test binaries).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let path = dir.join("examples").join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(path.is_file(), "{} is missing: run the tests through `cargo test`, which builds the examples", path.display());
    path
}

fn run_example(name: &str, args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(example(name));
    cmd.args(args);
    // Only what each test sets: CI exports HF_HUB_OFFLINE=1, and a developer may have HF_TOKEN.
    for k in ["HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE"] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the example")
}

#[test]
fn txt2img_without_a_model_downloads_the_default_and_then_runs_offline() {
    let hub = FakeHub::start(vec![fake_hub::sd_turbo_repo()]);
    let home = temp_dir("txt2img-home");
    let out = home.join("fox.png");
    let args = ["-p", "a red fox in the snow", "--width", "64", "--height", "64", "--seed", "7", "-o", out.to_str().expect("utf-8")];
    let env = [("HF_ENDPOINT", hub.endpoint()), ("HF_HOME", home.to_string_lossy().into_owned())];
    let o = run_example("txt2img", &args, &env);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("hub:stabilityai/sd-turbo") && stderr.contains("sd-turbo"), "{stderr}");
    assert!(home.join("hub/models--stabilityai--sd-turbo").is_dir(), "HF_HOME/hub is the cache");
    let first = std::fs::read(&out).expect("the PNG");
    let text = String::from_utf8_lossy(&first);
    // SD-Turbo's defaults: one step, no guidance.
    assert!(text.contains("Steps: 1,") && text.contains("CFG scale: 0"), "PNG parameters: {}", text.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(400).collect::<String>());
    drop(hub);

    // The hub is gone: offline mode reads the cache and gives the same picture.
    std::fs::remove_file(&out).expect("remove");
    let mut env = env.to_vec();
    env.push(("HF_HUB_OFFLINE", "1".into()));
    let o = run_example("txt2img", &args, &env);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&out).expect("the PNG"), first);
}

#[test]
fn examples_print_errors_as_sentences_and_exit_non_zero() {
    let dir = temp_dir("errors");
    let missing = dir.join("no-such-model.safetensors");
    let o = run_example("txt2img", &["-m", missing.to_str().expect("utf-8"), "-p", "x"], &[]);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.starts_with("error: ") && stderr.contains("not found at"), "{stderr}");
    assert!(!stderr.contains("NotFound {") && !stderr.contains("Error:"), "no Debug dump: {stderr}");

    // A checkpoint that does not fit the forced variant: ShapeMismatch used to print as a Debug struct.
    let sd15 = fake_hub::fixtures().join("sd15.safetensors");
    let o = run_example("txt2img", &["-m", sd15.to_str().expect("utf-8"), "--variant", "sd15-inpaint", "-p", "x"], &[]);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.starts_with("error: ") && !stderr.contains(" { "), "no Debug dump: {stderr}");

    let o = run_example("txt2img", &["-m", "hub:only-an-owner", "-p", "x"], &[("HF_HUB_OFFLINE", "1".into())]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains("owner and a name"), "{stderr}");

    // Offline and not cached: names the cause instead of hanging on the network.
    let o = run_example("txt2img", &["-p", "x"], &[("HF_HUB_OFFLINE", "1".into()), ("HF_HOME", dir.to_string_lossy().into_owned())]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: hub error for stabilityai/sd-turbo") && stderr.contains("HF_HUB_OFFLINE"), "{stderr}");
}

#[test]
fn the_token_comes_from_hf_token_or_the_login_file() {
    let mut repo = fake_hub::sd_turbo_repo();
    repo.token = Some("hf_gated".into());
    let hub = FakeHub::start(vec![repo]);
    let home = temp_dir("token-home");
    let out = home.join("out.png");
    let args = ["-p", "x", "--width", "64", "--height", "64", "-o", out.to_str().expect("utf-8")];
    let base = vec![("HF_ENDPOINT", hub.endpoint()), ("HF_HOME", home.to_string_lossy().into_owned())];
    let o = run_example("txt2img", &args, &base);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("401") && stderr.contains("HF_TOKEN"), "{stderr}");
    let mut with_env = base.clone();
    with_env.push(("HF_TOKEN", "hf_gated".into()));
    let o = run_example("txt2img", &args, &with_env);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // `huggingface-cli login` writes $HF_HOME/token; a fresh cache proves the file is read.
    let home2 = temp_dir("token-file");
    std::fs::write(home2.join("token"), "hf_gated\n").expect("token file");
    let o = run_example("txt2img", &args, &[("HF_ENDPOINT", hub.endpoint()), ("HF_HOME", home2.to_string_lossy().into_owned())]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
