//! crds/apikey.yaml must be exactly what the Rust types generate.

use keyward::crd::crd_yaml;

#[test]
fn committed_crd_matches_the_rust_types() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/apikey.yaml"))
            .expect("crds/apikey.yaml exists");
    assert!(
        committed == crd_yaml(),
        "crds/apikey.yaml is stale: run `cargo run -- crd > crds/apikey.yaml`"
    );
}

#[test]
fn keyward_crd_prints_the_committed_bytes() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(output.status.success());
    let committed =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/apikey.yaml")).unwrap();
    assert_eq!(output.stdout, committed);
}

#[test]
fn every_spec_and_status_field_is_documented() {
    let crd: serde_json::Value = serde_yaml::from_str(&crd_yaml()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
    for part in ["spec", "status"] {
        let properties = schema[part]["properties"].as_object().unwrap();
        assert!(!properties.is_empty());
        for (field, body) in properties {
            let description = body["description"].as_str().unwrap_or_default();
            assert!(description.len() > 10, "{part}.{field} has no description");
        }
    }
}
