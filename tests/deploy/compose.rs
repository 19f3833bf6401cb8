//! `deploy/docker/compose.shared.yaml`: two keygates sharing one Redis, on a config keygate
//! accepts whose `redis:` names the compose service.

use crate::{keygate_validates, s, seq, yaml_file};

#[test]
fn shared_compose_runs_two_keygates_on_one_redis_with_a_valid_config() {
    let compose = yaml_file("docker/compose.shared.yaml");
    let services = compose["services"].as_mapping().unwrap();
    assert!(services.contains_key("redis"));
    let keygates: Vec<_> = services
        .iter()
        .filter(|(name, _)| s(name).starts_with("keygate"))
        .map(|(_, svc)| svc)
        .collect();
    assert_eq!(keygates.len(), 2, "two instances");
    for svc in &keygates {
        let mounts: Vec<&str> = seq(&svc["volumes"]).iter().map(s).collect();
        assert!(
            mounts.contains(&"./keygate-shared.yaml:/etc/keygate/keygate.yaml:ro"),
            "{mounts:?}"
        );
        let deps: Vec<&str> = seq(&svc["depends_on"]).iter().map(s).collect();
        assert!(deps.contains(&"redis"), "{deps:?}");
        assert_eq!(s(&svc["image"]), "keygate:local");
    }
    let config = yaml_file("docker/keygate-shared.yaml");
    assert_eq!(s(&config["redis"]["url"]), "redis://redis:6379/0");
    assert_eq!(config["redis"]["instances"].as_u64(), Some(2));
    // `-t` checks the section without connecting: no Redis is needed here.
    keygate_validates(&config, "deploy/docker/keygate-shared.yaml");
}
