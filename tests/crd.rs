//! crds/*.yaml must be exactly what the Rust types generate.

use keyward::crd::{crd_yaml, policy_crd_yaml};

fn committed(file: &str) -> String {
    std::fs::read_to_string(format!("{}/crds/{file}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("crds/{file}: {e}"))
}

#[test]
fn committed_crds_match_the_rust_types() {
    assert!(
        committed("apikey.yaml") == crd_yaml(),
        "crds/apikey.yaml is stale: run `cargo run -- crd apikey > crds/apikey.yaml`"
    );
    assert!(
        committed("apikeypolicy.yaml") == policy_crd_yaml(),
        "crds/apikeypolicy.yaml is stale: run `cargo run -- crd apikeypolicy > crds/apikeypolicy.yaml`"
    );
}

#[test]
fn keyward_crd_prints_the_committed_bytes() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(output.status.success());
    let both = committed("apikey.yaml") + &committed("apikeypolicy.yaml");
    assert_eq!(String::from_utf8(output.stdout).unwrap(), both);
}

#[test]
fn every_spec_and_status_field_is_documented() {
    for yaml in [crd_yaml(), policy_crd_yaml()] {
        let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_owned();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
        for part in ["spec", "status"] {
            let properties = schema[part]["properties"].as_object().unwrap();
            assert!(!properties.is_empty());
            for (field, body) in properties {
                let description = body["description"].as_str().unwrap_or_default();
                assert!(
                    description.len() > 10,
                    "{kind} {part}.{field} has no description"
                );
            }
        }
    }
}
