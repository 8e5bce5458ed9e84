//! Reading the rendered deploy manifests (`kubectl kustomize`) in tests, and
//! checking a container's settings against a binary's clap definition.
//!
//! Shared by `deploy_agent.rs`, `deploy_scaler.rs` and `deploy_relay.rs`, so
//! every binary is held to the same rules.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The objects `kubectl kustomize deploy/<dir>` renders, or `None` (the test
/// is skipped) when kubectl is missing, unless `ITW_REQUIRE_TOOLS=1`.
pub fn render(test: &str, dir: &str) -> Option<Vec<Value>> {
    let path = deploy_dir().join(dir);
    let output = match Command::new("kubectl").arg("kustomize").arg(&path).output() {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var("ITW_REQUIRE_TOOLS").as_deref() == Ok("1") {
                panic!("{test}: kubectl is missing, and ITW_REQUIRE_TOOLS=1 forbids skipping");
            }
            eprintln!("SKIPPED {test}: kubectl is not installed (it renders the manifests)");
            return None;
        }
        Err(error) => panic!("{test}: running kubectl: {error}"),
    };
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("kubectl prints UTF-8");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("parsing the render of {}: {e}", path.display()));
    Some(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The examples (directories with a kustomization under deploy/examples).
pub fn example_dirs() -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                if path.join("kustomization.yaml").is_file() {
                    let rel = path.strip_prefix(base).expect("under deploy/");
                    out.push(rel.to_string_lossy().into_owned());
                }
                walk(&path, base, out);
            }
        }
    }
    let base = deploy_dir();
    let mut out = Vec::new();
    walk(&base.join("examples"), &base, &mut out);
    assert!(!out.is_empty(), "no example under deploy/examples");
    out
}

pub fn kind_of(obj: &Value) -> &str {
    obj["kind"].as_str().unwrap_or_default()
}

pub fn name_of(obj: &Value) -> &str {
    obj["metadata"]["name"].as_str().unwrap_or_default()
}

pub fn namespace_of(obj: &Value) -> &str {
    obj["metadata"]["namespace"].as_str().unwrap_or_default()
}

/// The one object of this kind and name.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<_> = objects
        .iter()
        .filter(|o| kind_of(o) == kind && name_of(o) == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} {name} in the render, found {}",
        found.len()
    );
    found[0]
}

pub fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

pub fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    pod_spec(workload)["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("{} has no container {name}", name_of(workload)))
}

/// A container env entry's value; values from the downward API or a Secret
/// stand in as plausible strings (the binary sees such a string at run time).
fn env_value(entry: &Value) -> Result<String, String> {
    let name = entry["name"].as_str().unwrap_or_default();
    if let Some(value) = entry.get("value") {
        return value
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("env {name}: value {value} is not a string"));
    }
    let from = &entry["valueFrom"];
    if from["fieldRef"]["fieldPath"] == "spec.nodeName" {
        return Ok("node-a".to_owned());
    }
    // An IPv4 node address (a documentation range: the test never connects).
    if from["fieldRef"]["fieldPath"] == "status.hostIP" {
        return Ok("192.0.2.10".to_owned());
    }
    if from.get("fieldRef").is_some()
        || from.get("secretKeyRef").is_some()
        || from.get("configMapKeyRef").is_some()
    {
        return Ok("from-the-cluster".to_owned());
    }
    Err(format!(
        "env {name}: neither value nor a valueFrom this test knows"
    ))
}

/// The command line the container's env and args amount to, for `cmd`: each
/// env var must be the `env` of one of its arguments (so a misspelt or
/// retired variable, which the binary would silently ignore, is an error).
pub fn argv_of(cmd: &clap::Command, container: &Value) -> Result<Vec<String>, Vec<String>> {
    let mut argv = vec![cmd.get_name().to_owned()];
    let mut problems = Vec::new();
    for entry in container["env"].as_array().into_iter().flatten() {
        let name = entry["name"].as_str().unwrap_or_default();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == name));
        let Some(arg) = arg else {
            problems.push(format!(
                "env {name} is not a setting of {} (its env vars: {})",
                cmd.get_name(),
                cmd.get_arguments()
                    .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            continue;
        };
        let long = arg.get_long().expect("every setting has a long flag");
        match env_value(entry) {
            Ok(value) => argv.push(format!("--{long}={value}")),
            Err(problem) => problems.push(problem),
        }
    }
    for arg in container["args"].as_array().into_iter().flatten() {
        argv.push(arg.as_str().unwrap_or_default().to_owned());
    }
    if container.get("command").is_some() {
        problems.push("the container overrides the image's entrypoint (command)".to_owned());
    }
    if problems.is_empty() {
        Ok(argv)
    } else {
        Err(problems)
    }
}

/// A container port by name or number.
pub fn container_port(container: &Value, port: &Value) -> Option<u16> {
    let ports = container["ports"].as_array()?;
    let found = match port {
        Value::String(name) => ports.iter().find(|p| p["name"] == name.as_str()),
        Value::Number(n) => ports
            .iter()
            .find(|p| p["containerPort"].as_u64() == n.as_u64()),
        _ => None,
    }?;
    found["containerPort"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
}

/// The port a bind address listens on, as a container port must expose it.
pub fn port_of(addr: SocketAddr) -> u16 {
    addr.port()
}

/// The volume behind a file path in the container, and the key of the Secret
/// or ConfigMap that file holds: `(volume, key)`.
pub fn volume_of_file<'a>(
    workload: &'a Value,
    container: &Value,
    file: &Path,
) -> Option<(&'a Value, String)> {
    let dir = file.parent()?;
    let file_name = file.file_name()?.to_string_lossy().into_owned();
    let mount = container["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["mountPath"].as_str().map(Path::new) == Some(dir))?;
    let volume = pod_spec(workload)["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == mount["name"])?;
    let source = volume.get("secret").or_else(|| volume.get("configMap"));
    let key = match source.and_then(|s| s["items"].as_array()) {
        Some(items) => items.iter().find(|i| i["path"] == file_name.as_str())?["key"]
            .as_str()?
            .to_owned(),
        None => file_name,
    };
    Some((volume, key))
}

/// One problem for each file setting that is set to a path no mounted Secret
/// holds: `(path, setting)` pairs, the setting named in the message.
pub fn files_not_in_secrets(
    workload: &Value,
    container: &Value,
    files: &[(&Option<PathBuf>, &str)],
) -> Vec<String> {
    files
        .iter()
        .filter_map(|(file, setting)| {
            let file = file.as_deref()?;
            volume_of_file(workload, container, file)
                .is_none_or(|(v, _)| v["secret"].is_null())
                .then(|| {
                    format!(
                        "{setting} {} is not a file of a mounted Secret",
                        file.display()
                    )
                })
        })
        .collect()
}

/// The hostPath behind a directory mounted in the container.
pub fn host_path_of_dir<'a>(workload: &'a Value, container: &Value, dir: &Path) -> Option<&'a str> {
    let mount = container["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["mountPath"].as_str().map(Path::new) == Some(dir))?;
    pod_spec(workload)["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == mount["name"])?["hostPath"]["path"]
        .as_str()
}

/// Sets `container.env[name] = value` in a copy of `workload` (adding it when
/// missing): the negative tests' way of breaking a manifest.
pub fn with_env(workload: &Value, container_name: &str, name: &str, value: &str) -> Value {
    let mut broken = workload.clone();
    let containers = broken["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .expect("containers");
    let c = containers
        .iter_mut()
        .find(|c| c["name"] == container_name)
        .expect("container");
    let env = c["env"].as_array_mut().expect("env");
    match env.iter_mut().find(|e| e["name"] == name) {
        Some(entry) => entry["value"] = Value::from(value),
        None => env.push(serde_json::json!({ "name": name, "value": value })),
    }
    broken
}
