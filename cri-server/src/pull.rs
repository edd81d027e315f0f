//! `podvisor pull IMAGE`: pulls into the local image store with a progress bar (bytes and layers). When the
//! daemon is running it owns the store, so the pull goes through its CRI socket instead (no byte progress:
//! CRI PullImage reports none).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use image_service::{Credentials, Digest, Progress};
use indicatif::{ProgressBar, ProgressStyle};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{AuthConfig, ImageSpec, PullImageRequest};
use tokio::net::UnixStream;
use tonic::transport::{Endpoint, Uri};

use crate::defaults;
use crate::images::{open_db, open_store, ImageArgs, OpenError};

/// `podvisor pull` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct PullArgs {
    /// Image reference (`busybox`, `registry:5000/app:v1`, `repo@sha256:…`).
    pub image: String,
    /// Registry username (basic auth).
    #[arg(long)]
    pub username: Option<String>,
    /// Registry password; read from PODVISOR_REGISTRY_PASSWORD when not given.
    #[arg(long)]
    pub password: Option<String>,
    /// State directory of the image store.
    #[arg(long, default_value = defaults::STATE_DIR)]
    pub state_dir: PathBuf,
    /// The daemon's CRI socket, used when the daemon holds the store.
    #[arg(long, default_value = defaults::SOCKET)]
    pub socket: PathBuf,
    /// Image store settings.
    #[command(flatten)]
    pub images: ImageArgs,
}

/// Drives an indicatif bar from pull progress.
struct Bar {
    bar: ProgressBar,
    layers: AtomicUsize,
    done: AtomicUsize,
}

impl Bar {
    fn message(&self) {
        self.bar.set_message(format!(
            "layers {}/{}",
            self.done.load(Ordering::Relaxed),
            self.layers.load(Ordering::Relaxed)
        ));
    }
}

impl Progress for Bar {
    fn resolved(&self, layers: usize, bytes: u64) {
        self.layers.store(layers, Ordering::Relaxed);
        self.bar.set_length(bytes);
        self.bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg:14} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        self.message();
    }

    fn bytes(&self, n: u64) {
        self.bar.inc(n);
    }

    fn layer_done(&self, _digest: &Digest, size: u64, cached: bool) {
        if cached {
            self.bar.inc(size);
        }
        self.done.fetch_add(1, Ordering::Relaxed);
        self.message();
    }

    fn stage(&self, stage: &str) {
        self.bar.set_message(stage.to_owned());
    }
}

fn spinner(msg: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(msg.to_owned());
    bar
}

async fn pull(args: PullArgs) -> Result<String, String> {
    let creds = Credentials {
        username: args.username.clone().unwrap_or_default(),
        password: args
            .password
            .clone()
            .or_else(|| std::env::var("PODVISOR_REGISTRY_PASSWORD").ok())
            .unwrap_or_default(),
        ..Default::default()
    };
    let store =
        open_db(&args.state_dir).and_then(|db| open_store(&db, &args.state_dir, &args.images));
    match store {
        Ok(service) => {
            let bar = Arc::new(Bar {
                bar: spinner("resolving"),
                layers: AtomicUsize::new(0),
                done: AtomicUsize::new(0),
            });
            let res = service
                .pull(&args.image, &creds, Some(bar.clone() as Arc<dyn Progress>))
                .await;
            bar.bar.finish_and_clear();
            let rec = res.map_err(|e| e.to_string())?;
            Ok(format!(
                "{} {} ({} layers, {} bytes; {})",
                args.image,
                rec.id,
                rec.layers.len(),
                rec.size,
                service.block_image_path(&rec).display()
            ))
        }
        Err(OpenError::Locked(_)) => {
            let bar = spinner("pulling through the running daemon");
            let res = pull_via_daemon(&args, &creds).await;
            bar.finish_and_clear();
            res.map(|id| format!("{} {id} (pulled by the daemon)", args.image))
        }
        Err(e) => Err(e.to_string()),
    }
}

async fn pull_via_daemon(args: &PullArgs, creds: &Credentials) -> Result<String, String> {
    let socket = args.socket.clone();
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|e| format!("{}: {e}", args.socket.display()))?;
    let resp = ImageServiceClient::new(channel)
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: args.image.clone(),
                ..Default::default()
            }),
            auth: Some(AuthConfig {
                username: creds.username.clone(),
                password: creds.password.clone(),
                ..Default::default()
            }),
            sandbox_config: None,
        })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(resp.into_inner().image_ref)
}

/// Runs `podvisor pull`.
pub fn run(args: PullArgs) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("podvisor: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(pull(args)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("podvisor pull: {e}");
            ExitCode::FAILURE
        }
    }
}
