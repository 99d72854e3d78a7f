//! The Go package of `go/` (module `github.com/ally-rs/ally/go`): its programs built
//! once per process with `go/offline.sh`, offline, from Debian's Go and libraries,
//! into `target/<profile>/go/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::target_dir;

/// What to install for the Go package and its examples.
pub const APT: &str = "apt install golang-go golang-dbus-dev golang-google-grpc-dev";

/// `go/` of this tree.
pub fn module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../go")
}

/// Why the Go package cannot be built here, or `None` if it can.
pub fn missing() -> Option<String> {
    let go = Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !go {
        return Some(format!("`go` is not installed ({APT})"));
    }
    let sources = [
        ("github.com/godbus/dbus", "godbus"),
        ("google.golang.org/grpc", "grpc-go"),
    ];
    sources.iter().find_map(|(path, name)| {
        let dir = Path::new("/usr/share/gocode/src").join(path);
        (!dir.is_dir()).then(|| format!("{name}'s sources are not in {} ({APT})", dir.display()))
    })
}

/// Builds `package` of the module (`./examples/http`) into `target/<profile>/go/<name>`,
/// once per process, and returns the binary's path; panics with what to install if
/// it cannot.
pub fn build(package: &str, name: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get_or_insert_with(HashMap::new).get(package) {
        return path.clone();
    }
    let binary = target_dir().join("go").join(name);
    let out = Command::new(module_dir().join("offline.sh"))
        .args(["build", "-o"])
        .arg(&binary)
        .arg(package)
        .env("GOCACHE", target_dir().join("go-cache"))
        .output()
        .unwrap_or_else(|e| panic!("running go/offline.sh: {e} ({APT})"));
    assert!(
        out.status.success(),
        "building {package} of the Go package with go/offline.sh ({APT}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    built
        .get_or_insert_with(HashMap::new)
        .insert(package.to_string(), binary.clone());
    binary
}

/// The net/http example (`go/examples/http`), served by `ally.Serve`.
pub fn hello_http() -> PathBuf {
    build("./examples/http", "hello-http")
}

/// The gRPC example (`go/examples/grpc`), served by `allygrpc.Serve`.
pub fn hello_grpc() -> PathBuf {
    build("./examples/grpc", "hello-grpc")
}

/// The grpc-go load client of `client/tests/load/grpc_go` (`grpc_go ADDR CLIENTS`:
/// unary `hello.Greeter/Hello` calls back to back on kept channels until stdin
/// closes, then `calls=N failed=M`).
pub fn grpc_load_client() -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../client/tests/load/grpc_go");
    build_program(&source, "grpc-load", APT)
}

/// Builds the Go program whose files are in `source` (a `main` package; a `go.mod`
/// there lets it import `.../v5` paths) into `target/<profile>/go/<name>`, once per
/// process, offline in GOPATH mode over Debian's `/usr/share/gocode`; panics saying
/// what to install (`install`) if it cannot.
pub fn build_program(source: &Path, name: &str, install: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get_or_insert_with(HashMap::new).get(name) {
        return path.clone();
    }
    let gopath = tempfile::tempdir().expect("a temporary GOPATH");
    let package = gopath.path().join("src").join(name);
    std::fs::create_dir_all(&package).expect("creating the Go package directory");
    for entry in std::fs::read_dir(source).expect("reading the Go program's directory") {
        let entry = entry.expect("reading the Go program's directory");
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(entry.path(), package.join(entry.file_name()))
                .expect("copying the Go program");
        }
    }
    let binary = target_dir().join("go").join(name);
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(".")
        .current_dir(&package)
        .env(
            "GOPATH",
            format!("{}:/usr/share/gocode", gopath.path().display()),
        )
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("GOCACHE", target_dir().join("go-cache"))
        .output()
        .unwrap_or_else(|e| panic!("running go: {e} ({install})"));
    assert!(
        out.status.success(),
        "building the Go program of {} ({install}): {}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    built
        .get_or_insert_with(HashMap::new)
        .insert(name.to_string(), binary.clone());
    binary
}

/// What a [`grpc_load_client`] counted.
#[derive(Debug)]
pub struct GrpcLoad {
    pub calls: u64,
    pub failed: u64,
    /// Its report line, `calls=N failed=M`.
    pub report: String,
}

/// Ends a running [`grpc_load_client`] (spawned with piped stdin and stdout) by
/// closing its stdin, and reads what it counted.
pub fn finish_grpc_load(mut load: std::process::Child) -> GrpcLoad {
    use std::io::Read;
    drop(load.stdin.take());
    let mut report = String::new();
    load.stdout
        .take()
        .expect("the load client's stdout, piped")
        .read_to_string(&mut report)
        .expect("reading the load client's report");
    assert!(
        load.wait().expect("waiting for the load client").success(),
        "{report}"
    );
    let number = |key: &str| -> u64 {
        report
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {report:?}"))
    };
    GrpcLoad {
        calls: number("calls="),
        failed: number("failed="),
        report: report.trim_end().to_string(),
    }
}
