//! The deployment files under docker/ agree with each other and with pgrelay: every YAML file
//! parses, the pgrelay configs they carry pass pgrelay's own validation, and the ports, probes,
//! mounts and names that tie the files together match. Nothing is run: no Docker engine and
//! no Kubernetes cluster is needed (docs/operations.md, "What was not validated here").

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is a failed test

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value;
use sha2::{Digest, Sha256};

/// The five services of docker/compose.yml.
const COMPOSE_SERVICES: [&str; 5] = ["primary", "replica", "pgrelay", "prometheus", "grafana"];

fn docker_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docker")
}

fn k8s_dir() -> PathBuf {
    docker_dir().join("k8s")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

/// Every document of a YAML file (a file may hold several, separated by `---`).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            Value::deserialize(document).unwrap_or_else(|error| panic!("{}: invalid YAML: {error}", path.display()))
        })
        .filter(|value| !value.is_null())
        .collect()
}

fn yaml(path: &Path) -> Value {
    let mut documents = yaml_documents(path);
    assert_eq!(documents.len(), 1, "{}: expected one YAML document", path.display());
    documents.remove(0)
}

/// Every `.yml` / `.yaml` file under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "yml" || ext == "yaml") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {value:?}"))
}

fn u64_of(value: &Value, what: &str) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: expected a whole number, found {value:?}"))
}

fn seq_of<'a>(value: &'a Value, what: &str) -> &'a Vec<Value> {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("{what}: expected a list, found {value:?}"))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

/// Parses a pgrelay config with pgrelay itself, failing with every problem it reports.
fn valid_config(text: &str, origin: &str) -> pgrelay::config::Config {
    pgrelay::config::parse(text).unwrap_or_else(|errors| panic!("{origin} is not a valid pgrelay config:\n{errors}"))
}

// ---- Kubernetes --------------------------------------------------------------------------

/// Every resource in docker/k8s except the kustomization, as (file name, document).
fn k8s_resources() -> Vec<(String, Value)> {
    let mut resources = Vec::new();
    for path in yaml_files(&k8s_dir()) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "kustomization.yaml" {
            continue;
        }
        for document in yaml_documents(&path) {
            resources.push((name.clone(), document));
        }
    }
    resources
}

fn k8s_resource(kind: &str, name: &str) -> Value {
    k8s_resources()
        .into_iter()
        .map(|(_, resource)| resource)
        .find(|resource| resource["kind"] == kind && resource["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name} in docker/k8s"))
}

/// The pgrelay.toml of the ConfigMap, as text.
fn k8s_config_text() -> String {
    let config_map = k8s_resource("ConfigMap", "pgrelay-config");
    str_of(
        &config_map["data"]["pgrelay.toml"],
        "ConfigMap pgrelay-config data.pgrelay.toml",
    )
    .to_owned()
}

fn pgrelay_container(deployment: &Value) -> &Value {
    seq_of(&deployment["spec"]["template"]["spec"]["containers"], "containers")
        .iter()
        .find(|container| container["name"] == "pgrelay")
        .expect("the StatefulSet has no container named pgrelay")
}

/// The container port a probe or Service refers to, by name or by number.
fn resolve_port(container: &Value, port: &Value) -> u64 {
    if let Some(number) = port.as_u64() {
        return number;
    }
    let name = str_of(port, "port");
    let ports = seq_of(&container["ports"], "container ports");
    let found = ports
        .iter()
        .find(|candidate| candidate["name"] == name)
        .unwrap_or_else(|| panic!("the container has no port named {name:?}"));
    u64_of(&found["containerPort"], "containerPort")
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_mapping().expect("selector labels");
    !selector.is_empty()
        && selector
            .iter()
            .all(|(key, value)| labels[key.as_str().unwrap()] == *value)
}

#[test]
fn every_yaml_file_parses() {
    let files = yaml_files(&docker_dir());
    for required in [
        "compose.yml",
        "prometheus.yml",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/pgrelay.yml",
        "k8s/kustomization.yaml",
    ] {
        assert!(
            files.contains(&docker_dir().join(required)),
            "docker/{required} is missing"
        );
    }
    for path in files {
        assert!(!yaml_documents(&path).is_empty(), "{} is empty", path.display());
    }
}

#[test]
fn k8s_manifests_name_their_kind_and_the_kustomization_lists_them() {
    for (file, resource) in k8s_resources() {
        for key in ["apiVersion", "kind"] {
            str_of(&resource[key], &format!("{file}: {key}"));
        }
        let name = str_of(&resource["metadata"]["name"], &format!("{file}: metadata.name"));
        assert!(!name.is_empty(), "{file}: empty metadata.name");
    }

    let kustomization = yaml(&k8s_dir().join("kustomization.yaml"));
    assert_eq!(kustomization["kind"], "Kustomization");
    let listed: BTreeSet<&str> = seq_of(&kustomization["resources"], "kustomization resources")
        .iter()
        .map(|resource| str_of(resource, "kustomization resource"))
        .collect();
    for file in &listed {
        assert!(
            k8s_dir().join(file).is_file(),
            "kustomization.yaml lists {file}, which does not exist"
        );
    }
    // secret.yaml is the documented alternative to configmap.yaml, applied instead of it.
    for path in yaml_files(&k8s_dir()) {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if file != "kustomization.yaml" && file != "secret.yaml" {
            assert!(
                listed.contains(file.as_str()),
                "kustomization.yaml does not list {file}"
            );
        }
    }
}

#[test]
fn k8s_config_is_valid_and_its_checksum_annotation_is_current() {
    let text = k8s_config_text();
    valid_config(&text, "docker/k8s/configmap.yaml (pgrelay.toml)");

    // The Secret alternative must say the same, or switching to it changes the config.
    if let Some((_, secret)) = k8s_resources()
        .into_iter()
        .find(|(_, resource)| resource["kind"] == "Secret" && resource["metadata"]["name"] == "pgrelay-config")
    {
        let secret_text = str_of(
            &secret["stringData"]["pgrelay.toml"],
            "secret.yaml stringData.pgrelay.toml",
        );
        valid_config(secret_text, "docker/k8s/secret.yaml (pgrelay.toml)");
        assert_eq!(
            secret_text, text,
            "secret.yaml and configmap.yaml hold different pgrelay.toml files"
        );
    }

    let digest: String = Sha256::digest(text.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let deployment = k8s_resource("StatefulSet", "pgrelay");
    let annotation = &deployment["spec"]["template"]["metadata"]["annotations"]["pgrelay/config-sha256"];
    assert_eq!(
        str_of(annotation, "the pgrelay/config-sha256 annotation"),
        digest,
        "configmap.yaml changed: set pgrelay/config-sha256 in statefulset.yaml to \"{digest}\""
    );
}

#[test]
fn k8s_statefulset_probes_ports_and_shutdown_agree_with_the_config() {
    let config = valid_config(&k8s_config_text(), "docker/k8s/configmap.yaml");
    let metrics_port = u64::from(port_of(
        config
            .server
            .metrics_listen
            .as_deref()
            .expect("metrics_listen is disabled"),
    ));
    let listen_port = u64::from(port_of(&config.server.listen));
    assert!(
        config.server.listen.starts_with("0.0.0.0:")
            && config.server.metrics_listen.as_deref().unwrap().starts_with("0.0.0.0:"),
        "in a pod, listen and metrics_listen must not be loopback addresses"
    );

    let deployment = k8s_resource("StatefulSet", "pgrelay");
    assert_eq!(deployment["apiVersion"], "apps/v1");
    assert_eq!(u64_of(&deployment["spec"]["replicas"], "replicas"), 3);
    let pod = &deployment["spec"]["template"]["spec"];
    assert!(
        labels_match(
            &deployment["spec"]["selector"]["matchLabels"],
            &deployment["spec"]["template"]["metadata"]["labels"]
        ),
        "the StatefulSet's selector does not match its pod labels"
    );
    let container = pgrelay_container(&deployment);

    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe} path");
        assert_eq!(
            resolve_port(container, &get["port"]),
            metrics_port,
            "{probe} must use the metrics port"
        );
    }
    let ports: BTreeSet<u64> = seq_of(&container["ports"], "container ports")
        .iter()
        .map(|port| u64_of(&port["containerPort"], "containerPort"))
        .collect();
    assert!(
        ports.contains(&listen_port),
        "the container does not declare the listen port {listen_port}"
    );

    // Non-root, read-only root file system.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_ne!(u64_of(&pod["securityContext"]["runAsUser"], "runAsUser"), 0);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);

    // The kubelet must not SIGKILL a pod that is still letting transactions finish.
    let grace = u64_of(&pod["terminationGracePeriodSeconds"], "terminationGracePeriodSeconds");
    let pre_stop: u64 = seq_of(&container["lifecycle"]["preStop"]["exec"]["command"], "preStop command")
        .iter()
        .filter_map(|word| word.as_str().and_then(|word| word.parse::<u64>().ok()))
        .sum();
    let shutdown = config
        .server
        .shutdown_timeout
        .expect("shutdown_timeout = \"0\" (wait for ever) cannot fit in a grace period");
    assert!(
        Duration::from_secs(grace) > Duration::from_secs(pre_stop) + shutdown,
        "terminationGracePeriodSeconds ({grace}s) must exceed the preStop sleep ({pre_stop}s) + shutdown_timeout ({shutdown:?})"
    );

    let volume = seq_of(&pod["volumes"], "volumes")
        .iter()
        .find(|volume| volume["name"] == "config")
        .expect("no volume named config");
    assert_eq!(volume["configMap"]["name"], "pgrelay-config");
    let mount = seq_of(&container["volumeMounts"], "volumeMounts")
        .iter()
        .find(|mount| mount["name"] == "config")
        .expect("the config volume is not mounted");
    assert!(
        mount["subPath"].is_null(),
        "a subPath mount never sees ConfigMap updates"
    );
    let args: Vec<&str> = seq_of(&container["args"], "args")
        .iter()
        .map(|arg| str_of(arg, "arg"))
        .collect();
    let config_path = args
        .iter()
        .position(|arg| *arg == "--config" || *arg == "-c")
        .and_then(|index| args.get(index + 1))
        .expect("the container args name no --config file");
    assert_eq!(
        Path::new(config_path).parent().unwrap(),
        Path::new(str_of(&mount["mountPath"], "mountPath")),
        "--config does not point into the mounted config directory"
    );
}

#[test]
fn k8s_services_pdb_and_hpa_select_the_statefulset() {
    let deployment = k8s_resource("StatefulSet", "pgrelay");
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let container = pgrelay_container(&deployment);
    let config = valid_config(&k8s_config_text(), "docker/k8s/configmap.yaml");

    let service = k8s_resource("Service", "pgrelay");
    assert!(
        labels_match(&service["spec"]["selector"], pod_labels),
        "Service pgrelay selects no pgrelay pod"
    );
    let postgres = seq_of(&service["spec"]["ports"], "Service ports")
        .iter()
        .find(|port| port["port"] == 6432)
        .expect("Service pgrelay does not expose 6432");
    assert_eq!(
        resolve_port(container, &postgres["targetPort"]),
        u64::from(port_of(&config.server.listen))
    );

    let metrics = k8s_resource("Service", "pgrelay-metrics");
    assert!(labels_match(&metrics["spec"]["selector"], pod_labels));
    let metrics_port = seq_of(&metrics["spec"]["ports"], "metrics Service ports")
        .first()
        .expect("the metrics Service has no port");
    assert_eq!(
        resolve_port(container, &metrics_port["targetPort"]),
        u64::from(port_of(config.server.metrics_listen.as_deref().unwrap()))
    );
    assert_eq!(metrics["metadata"]["annotations"]["prometheus.io/scrape"], "true");

    let pdb = k8s_resource("PodDisruptionBudget", "pgrelay");
    assert!(labels_match(&pdb["spec"]["selector"]["matchLabels"], pod_labels));

    let hpa = k8s_resource("HorizontalPodAutoscaler", "pgrelay");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "StatefulSet");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "pgrelay");
    assert!(
        !container["resources"]["requests"]["cpu"].is_null(),
        "an HPA on CPU needs a CPU request"
    );
}

/// Cancel requests across pods: every pod gets its own instance id from its StatefulSet
/// name, and peers_dns names the headless Service that lists every pod (not-ready ones too)
/// at the port of peer_listen, which the container declares.
#[test]
fn k8s_pods_have_their_own_instance_id_and_find_each_other() {
    use pgrelay::config::{InstanceIdSetting, Peers};
    let config = valid_config(&k8s_config_text(), "docker/k8s/configmap.yaml");
    assert_eq!(
        config.server.instance_id,
        InstanceIdSetting::Hostname,
        "pods share one config: the id must come from the pod's name"
    );
    let statefulset = k8s_resource("StatefulSet", "pgrelay");
    let pod_labels = &statefulset["spec"]["template"]["metadata"]["labels"];
    let container = pgrelay_container(&statefulset);
    let service_name = str_of(&statefulset["spec"]["serviceName"], "serviceName");
    let headless = k8s_resource("Service", service_name);
    assert_eq!(headless["spec"]["clusterIP"], "None", "{service_name} must be headless");
    assert_eq!(
        headless["spec"]["publishNotReadyAddresses"], true,
        "a draining pod must stay reachable for cancels"
    );
    assert!(labels_match(&headless["spec"]["selector"], pod_labels));

    let Peers::Dns(peers_dns) = &config.server.peers else {
        panic!("the config has no peers_dns: {:?}", config.server.peers);
    };
    let (host, port) = peers_dns.rsplit_once(':').unwrap();
    assert_eq!(
        host, service_name,
        "peers_dns must name the StatefulSet's headless Service"
    );
    let peer_listen = config.server.peer_listen.as_deref().expect("peer_listen");
    assert!(
        peer_listen.starts_with("0.0.0.0:"),
        "peer_listen must not be loopback in a pod"
    );
    assert_eq!(u64::from(port_of(peer_listen)), port.parse::<u64>().unwrap());
    let ports: BTreeSet<u64> = seq_of(&container["ports"], "container ports")
        .iter()
        .map(|port| u64_of(&port["containerPort"], "containerPort"))
        .collect();
    assert!(
        ports.contains(&u64::from(port_of(peer_listen))),
        "peer_listen's port is not declared"
    );
    let service_port = seq_of(&headless["spec"]["ports"], "headless Service ports")
        .first()
        .expect("the headless Service has no port");
    assert_eq!(
        resolve_port(container, &service_port["targetPort"]),
        u64::from(port_of(peer_listen))
    );

    // Instance ids are 0-255: so are the ordinals.
    let hpa = k8s_resource("HorizontalPodAutoscaler", "pgrelay");
    assert!(u64_of(&hpa["spec"]["maxReplicas"], "maxReplicas") <= 256);
    assert!(u64_of(&statefulset["spec"]["replicas"], "replicas") <= 256);
    // The client-facing Service needs no affinity for cancels any more.
    let service = k8s_resource("Service", "pgrelay");
    assert!(service["spec"]["sessionAffinity"].is_null() || service["spec"]["sessionAffinity"] == "None");
}

// ---- Docker Compose ----------------------------------------------------------------------

fn compose() -> Value {
    yaml(&docker_dir().join("compose.yml"))
}

fn compose_config() -> pgrelay::config::Config {
    valid_config(&read(&docker_dir().join("pgrelay.toml")), "docker/pgrelay.toml")
}

/// `(source, target)` of each `./file:target[:mode]` bind mount of a service.
fn bind_mounts(service: &Value) -> Vec<(String, String)> {
    let Some(volumes) = service["volumes"].as_sequence() else {
        return Vec::new();
    };
    volumes
        .iter()
        .filter_map(|volume| {
            let mut parts = volume.as_str()?.split(':');
            let source = parts.next()?;
            let target = parts.next()?;
            source.starts_with('.').then(|| (source.to_owned(), target.to_owned()))
        })
        .collect()
}

#[test]
fn compose_has_the_five_services_and_every_mounted_file_exists() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("compose.yml has no services");
    let names: BTreeSet<&str> = services.keys().map(|key| key.as_str().unwrap()).collect();
    assert_eq!(names, COMPOSE_SERVICES.into_iter().collect::<BTreeSet<_>>());

    for (name, service) in services {
        let name = name.as_str().unwrap();
        for (source, _) in bind_mounts(service) {
            let path = docker_dir().join(&source);
            assert!(
                path.exists(),
                "service {name:?} mounts {source}, which does not exist in docker/"
            );
        }
        if let Some(depends) = service["depends_on"].as_mapping() {
            for (other, condition) in depends {
                let other = other.as_str().unwrap();
                assert!(
                    names.contains(other),
                    "{name:?} depends on an unknown service {other:?}"
                );
                if condition["condition"] == "service_healthy" {
                    assert!(
                        !services[other]["healthcheck"].is_null(),
                        "{name:?} waits for {other:?} to be healthy, which has no healthcheck"
                    );
                }
            }
        }
    }

    let pgrelay = &compose["services"]["pgrelay"];
    assert_eq!(pgrelay["build"]["context"], "..");
    assert_eq!(pgrelay["build"]["dockerfile"], "docker/Dockerfile");
    assert!(docker_dir().join("Dockerfile").is_file());
}

#[test]
fn compose_pgrelay_config_is_valid_and_matches_the_stack() {
    let config = compose_config();
    let compose = compose();
    let services = &compose["services"];

    // The config the pgrelay service runs is docker/pgrelay.toml.
    let mounts = bind_mounts(&services["pgrelay"]);
    let (_, target) = mounts
        .iter()
        .find(|(source, _)| source == "./pgrelay.toml")
        .expect("the pgrelay service does not mount ./pgrelay.toml");
    let command: Vec<&str> = seq_of(&services["pgrelay"]["command"], "pgrelay command")
        .iter()
        .map(|word| str_of(word, "command word"))
        .collect();
    assert!(
        command.windows(2).any(|pair| pair == ["--config", target.as_str()]),
        "{command:?}"
    );

    assert_eq!(config.server.listen, "0.0.0.0:6432");
    let metrics_listen = config
        .server
        .metrics_listen
        .clone()
        .expect("metrics_listen is disabled");
    assert_eq!(metrics_listen, "0.0.0.0:9930");
    let published: Vec<&str> = seq_of(&services["pgrelay"]["ports"], "pgrelay ports")
        .iter()
        .map(|port| str_of(port, "port"))
        .collect();
    for port in [port_of(&config.server.listen), port_of(&metrics_listen)] {
        assert!(
            published.contains(&format!("{port}:{port}").as_str()),
            "port {port} is not published"
        );
    }

    // Every server the config names is a compose service.
    let database = config.databases.get("app").expect("no database app");
    assert_eq!(database.primary, "primary:5432");
    assert_eq!(database.replicas, ["replica:5432"]);
    for (name, database) in &config.databases {
        for addr in std::iter::once(&database.primary).chain(&database.replicas) {
            let host = addr.rsplit_once(':').unwrap().0;
            assert!(
                !services[host].is_null(),
                "databases.{name} names {host}, which is not a compose service"
            );
        }
    }
    for user in ["app", "admin", "monitor"] {
        assert!(config.user(user).is_some(), "user {user} is missing");
    }
    assert!(config.is_admin("admin") && config.is_stats_user("monitor"));

    // compose must wait longer than shutdown_timeout before SIGKILL.
    let grace = str_of(&services["pgrelay"]["stop_grace_period"], "stop_grace_period");
    let grace = pgrelay::config::parse_duration(grace).unwrap();
    assert!(
        grace > config.server.shutdown_timeout.expect("shutdown_timeout"),
        "stop_grace_period too short"
    );
}

#[test]
fn prometheus_scrapes_pgrelay_and_loads_the_alert_rules() {
    let config = compose_config();
    let prometheus = yaml(&docker_dir().join("prometheus.yml"));
    let metrics_port = port_of(config.server.metrics_listen.as_deref().unwrap());
    let targets: Vec<&str> = seq_of(&prometheus["scrape_configs"], "scrape_configs")
        .iter()
        .flat_map(|job| job["static_configs"].as_sequence().into_iter().flatten())
        .flat_map(|static_config| static_config["targets"].as_sequence().into_iter().flatten())
        .map(|target| str_of(target, "target"))
        .collect();
    assert!(
        targets.contains(&format!("pgrelay:{metrics_port}").as_str()),
        "{targets:?}"
    );

    let compose = compose();
    let mounts = bind_mounts(&compose["services"]["prometheus"]);
    let rule_files: Vec<&str> = seq_of(&prometheus["rule_files"], "rule_files")
        .iter()
        .map(|file| str_of(file, "rule file"))
        .collect();
    let (_, alerts_target) = mounts
        .iter()
        .find(|(source, _)| source == "./prometheus-alerts.yml")
        .expect("prometheus does not mount ./prometheus-alerts.yml");
    assert!(rule_files.contains(&alerts_target.as_str()), "{rule_files:?}");
    let (_, config_target) = mounts
        .iter()
        .find(|(source, _)| source == "./prometheus.yml")
        .expect("prometheus does not mount ./prometheus.yml");
    let command: Vec<&str> = seq_of(&compose["services"]["prometheus"]["command"], "prometheus command")
        .iter()
        .map(|word| str_of(word, "word"))
        .collect();
    assert!(command.contains(&format!("--config.file={config_target}").as_str()));
}

#[test]
fn grafana_provisioning_points_at_prometheus_and_the_dashboard() {
    let compose = compose();
    let datasources = yaml(&docker_dir().join("grafana/provisioning/datasources/prometheus.yml"));
    let datasource = seq_of(&datasources["datasources"], "datasources")
        .first()
        .expect("no datasource")
        .clone();
    assert_eq!(datasource["type"], "prometheus");
    let url = str_of(&datasource["url"], "datasource url");
    let host = url.trim_start_matches("http://").split(':').next().unwrap_or_default();
    assert!(
        !compose["services"][host].is_null(),
        "datasource url {url} names no compose service"
    );

    let providers = yaml(&docker_dir().join("grafana/provisioning/dashboards/pgrelay.yml"));
    let dashboards_path = str_of(
        &seq_of(&providers["providers"], "providers")
            .first()
            .expect("no provider")["options"]["path"],
        "provider path",
    )
    .to_owned();
    let mounts = bind_mounts(&compose["services"]["grafana"]);
    let (_, dashboard_target) = mounts
        .iter()
        .find(|(source, _)| source == "./grafana-dashboard.json")
        .expect("grafana does not mount ./grafana-dashboard.json");
    assert_eq!(
        Path::new(dashboard_target).parent().unwrap(),
        Path::new(&dashboards_path)
    );
    assert!(
        mounts
            .iter()
            .any(|(source, target)| source == "./grafana/provisioning" && target == "/etc/grafana/provisioning"),
        "the provisioning directory is not mounted"
    );
}

// ---- Dockerfile --------------------------------------------------------------------------

/// The Dockerfile's instructions as (keyword, arguments), continuation lines joined and
/// comments dropped.
fn dockerfile_instructions() -> Vec<(String, String)> {
    let text = read(&docker_dir().join("Dockerfile"));
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current.split_once(char::is_whitespace).unwrap_or((&current, ""));
        instructions.push((keyword.to_ascii_uppercase(), args.trim().to_owned()));
        current.clear();
    }
    instructions
}

#[test]
fn dockerfile_final_stage_runs_pgrelay_as_a_non_root_user() {
    let instructions = dockerfile_instructions();
    let stages = instructions.iter().filter(|(keyword, _)| keyword == "FROM").count();
    assert!(stages >= 2, "expected a multi-stage build");
    let last_from = instructions.iter().rposition(|(keyword, _)| keyword == "FROM").unwrap();
    let last_stage = &instructions[last_from..];
    let find = |wanted: &str| {
        last_stage
            .iter()
            .rev()
            .find(|(keyword, _)| keyword == wanted)
            .map(|(_, args)| args.as_str())
            .unwrap_or_else(|| panic!("the final stage has no {wanted}"))
    };

    let user = find("USER");
    let name = user.split(':').next().unwrap();
    assert!(name != "root" && name != "0", "the final stage runs as {user}");
    let exposed: BTreeSet<&str> = find("EXPOSE").split_whitespace().collect();
    assert!(
        exposed.contains("6432") && exposed.contains("9930"),
        "EXPOSE {exposed:?}"
    );
    assert_eq!(find("ENTRYPOINT"), r#"["pgrelay"]"#);
    assert_eq!(find("CMD"), r#"["run", "--config", "/etc/pgrelay/pgrelay.toml"]"#);
    assert_eq!(find("STOPSIGNAL"), "SIGTERM");
    assert!(find("HEALTHCHECK").contains("CMD"));

    // The build stage uses a toolchain at least as new as Cargo.toml's rust-version.
    let manifest: toml::Table =
        toml::from_str(&read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))).unwrap();
    let minimum = manifest["package"]["rust-version"].as_str().expect("rust-version");
    let toolchain = instructions
        .iter()
        .find(|(keyword, args)| keyword == "ARG" && args.starts_with("RUST_VERSION="))
        .map(|(_, args)| args.trim_start_matches("RUST_VERSION="))
        .expect("no ARG RUST_VERSION");
    let numbers = |version: &str| -> Vec<u32> { version.split('.').map(|part| part.parse().unwrap()).collect() };
    assert!(
        numbers(toolchain) >= numbers(minimum),
        "rust {toolchain} is older than rust-version {minimum}"
    );
    assert!(
        instructions
            .iter()
            .any(|(keyword, args)| keyword == "RUN" && args.contains("cargo build --release --locked --bin pgrelay"))
    );
}

#[test]
fn dockerignore_keeps_the_files_the_dockerfile_copies() {
    let ignore = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".dockerignore"));
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    for excluded in ["target/", ".git/"] {
        assert!(
            patterns.contains(&excluded),
            ".dockerignore does not exclude {excluded}"
        );
    }
    // Sources copied from docker/ (which is excluded as a whole) must be re-included.
    for (keyword, args) in dockerfile_instructions() {
        if keyword != "COPY" || args.contains("--from=") {
            continue;
        }
        let words: Vec<&str> = args.split_whitespace().filter(|word| !word.starts_with("--")).collect();
        for source in &words[..words.len() - 1] {
            if source.starts_with("docker/") {
                assert!(
                    patterns.contains(&format!("!{source}").as_str()),
                    ".dockerignore excludes {source}, which the Dockerfile copies"
                );
                assert!(
                    Path::new(env!("CARGO_MANIFEST_DIR")).join(source).is_file(),
                    "{source} is missing"
                );
            }
        }
    }
}
