#![allow(clippy::unwrap_used)]

use super::*;
use crate::clients::digest;
use crate::clients::limits::Limits;
use crate::clock::ManualClock;
use crate::keys::{CooldownPolicy, KeyPolicy, KeySpec};
use bytes::Bytes;

/// Answers every probe with a fixed status and body, and counts them.
struct FakeProbes {
    answers: Mutex<Vec<(u16, &'static str)>>,
    sent: Mutex<Vec<(usize, KeyIndex, ProbeKind)>>,
}

#[async_trait]
impl Probes for FakeProbes {
    fn endpoints(&self, _u: usize) -> Vec<EndpointView> {
        vec![EndpointView {
            addr: "127.0.0.1:9".into(),
            healthy: true,
            ejected: false,
        }]
    }

    async fn send(&self, u: usize, k: KeyIndex, kind: ProbeKind) -> Result<ProbeAnswer, String> {
        self.sent.lock().push((u, k, kind));
        let mut answers = self.answers.lock();
        if answers.is_empty() {
            return Err("connection refused".into());
        }
        let (status, body) = answers.remove(0);
        Ok(ProbeAnswer {
            status,
            body: Bytes::from_static(body.as_bytes()),
        })
    }
}

const SECRET_B: &str = "sk-live-bbbbbbbbbbbbbbbbbbbb";

fn admin(answers: Vec<(u16, &'static str)>) -> (Admin, Arc<FakeProbes>) {
    let clock = ManualClock::new();
    let pool = Arc::new(KeyPool::new(
        "openai",
        vec![
            KeySpec::named("a", "sk-live-aaaaaaaaaaaaaaaaaaaa"),
            KeySpec::named("b", SECRET_B),
        ],
        KeyPolicy::RoundRobin,
        CooldownPolicy::default(),
        clock.clone(),
    ));
    let probes = Arc::new(FakeProbes {
        answers: Mutex::new(answers),
        sent: Mutex::new(Vec::new()),
    });
    let admin = Admin::new(
        AdminAuth::new(Some(digest(b"adm")), Some(digest(b"rd"))),
        vec![AdminUpstream {
            name: "openai".into(),
            api: "openai",
            keys: pool,
            activity: Arc::new(crate::key_activity::KeyActivity::new(2, clock.clone())),
        }],
        vec![RouteView {
            name: "chat".into(),
            models: vec!["gpt-*".into()],
            path_prefix: None,
            upstreams: vec!["openai".into()],
        }],
        vec![(
            "team".into(),
            Limiter::new(
                Limits {
                    rpm: Some(10),
                    ..Limits::default()
                },
                clock.clone(),
            ),
        )],
        probes.clone(),
        clock,
    );
    (admin, probes)
}

fn call(
    admin: &Admin,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let auth = format!("Bearer {token}");
    let req = AdminRequest {
        method,
        path,
        authorization: Some(auth.as_bytes()),
        body: body.as_bytes(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let r = rt.block_on(admin.serve(&req));
    (r.status, serde_json::from_slice(&r.body).unwrap())
}

#[test]
fn status_lists_upstreams_with_endpoints_and_keys_routes_and_clients() {
    let (a, _) = admin(vec![]);
    let (status, v) = call(&a, "GET", "/admin/v1/status", "rd", "");
    assert_eq!(status, 200);
    let up = &v["upstreams"][0];
    assert_eq!(up["name"], "openai");
    assert_eq!(up["api"], "openai");
    assert_eq!(up["endpoints"][0]["healthy"], true);
    assert_eq!(up["keys"][1]["name"], "b");
    assert_eq!(v["routes"][0]["models"][0], "gpt-*");
    assert_eq!(v["clients"][0]["name"], "team");
    assert_eq!(v["clients"][0]["limits"]["rpm"], 10);
    assert_eq!(v["clients"][0]["in_flight"], 0);
    assert!(v["clients"][0]["budget_left"].is_null());
    assert!(!v.to_string().contains("sk-live"), "{v}");
}

#[test]
fn disable_with_a_note_then_enable() {
    let (a, _) = admin(vec![]);
    let (status, v) = call(
        &a,
        "POST",
        "/admin/v1/keys/openai/b/disable",
        "adm",
        r#"{"reason":"rotating"}"#,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["changed"], true);
    assert_eq!(v["key"]["state"], "disabled");
    assert_eq!(v["key"]["reason"], "manual");
    assert_eq!(v["key"]["note"], "rotating");
    let (_, keys) = call(&a, "GET", "/admin/v1/keys", "rd", "");
    assert_eq!(keys["keys"][1]["reason"], "manual");
    assert_eq!(keys["keys"][0]["state"], "ready");
    let (_, again) = call(&a, "POST", "/admin/v1/keys/openai/b/disable", "adm", "");
    assert_eq!(again["changed"], false);
    let (status, v) = call(&a, "POST", "/admin/v1/keys/openai/b/enable", "adm", "");
    assert_eq!(status, 200);
    assert_eq!(
        (v["changed"].clone(), v["key"]["state"].clone()),
        (true.into(), "ready".into())
    );
    assert!(v["key"]["note"].is_null());
}

#[test]
fn the_read_token_cannot_act_and_unknown_keys_are_404() {
    let (a, _) = admin(vec![]);
    assert_eq!(
        call(&a, "POST", "/admin/v1/keys/openai/b/disable", "rd", "").0,
        403
    );
    assert_eq!(call(&a, "GET", "/admin/v1/keys", "bad", "").0, 401);
    let (status, v) = call(&a, "POST", "/admin/v1/keys/openai/zz/disable", "adm", "");
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "key_not_found");
    assert_eq!(
        call(&a, "POST", "/admin/v1/keys/nope/b/enable", "adm", "").0,
        404
    );
}

#[test]
fn a_test_returns_the_upstreams_verdict_with_the_key_masked() {
    let body = r#"{"error":{"message":"Incorrect API key provided: sk-live-bbbbbbbbbbbbbbbbbbbb for org-abcdefghijkl","code":"invalid_api_key"}}"#;
    let (a, probes) = admin(vec![(200, "{}"), (401, body)]);
    let (status, v) = call(&a, "POST", "/admin/v1/keys/openai/b/test", "adm", "");
    assert_eq!(status, 200);
    assert_eq!(
        (v["ok"].clone(), v["status"].clone()),
        (true.into(), 200.into())
    );
    let (_, v) = call(&a, "POST", "/admin/v1/keys/openai/b/test", "adm", "");
    assert_eq!(
        (v["ok"].clone(), v["status"].clone()),
        (false.into(), 401.into())
    );
    let msg = v["message"].as_str().unwrap();
    assert!(msg.starts_with("Incorrect API key provided"), "{msg}");
    assert!(!msg.contains("bbbbbbbb"), "{msg}");
    assert!(!msg.contains("abcdefghijkl"), "{msg}");
    assert_eq!(probes.sent.lock()[0], (0, 1, ProbeKind::Models));
    // A failing test never disables the key: the prober and the proxy judge traffic.
    assert!(a.upstreams[0].keys.disabled().is_empty());
}

#[test]
fn a_passing_test_puts_back_an_auth_disabled_key_but_never_a_manual_one() {
    let (a, _) = admin(vec![(200, "{}"), (200, "{}")]);
    let pool = a.upstreams[0].keys.clone();
    pool.disable(0, DisableReason::Unauthorized);
    call(&a, "POST", "/admin/v1/keys/openai/a/test", "adm", "");
    assert!(pool.disabled().is_empty());
    pool.disable_manually(0);
    let (_, v) = call(&a, "POST", "/admin/v1/keys/openai/a/test", "adm", "");
    assert_eq!(v["ok"], true);
    assert_eq!(pool.disabled(), vec![(0, DisableReason::Manual)]);
}

#[test]
fn a_refused_models_listing_is_followed_by_a_completion_and_no_answer_is_502() {
    let (a, probes) = admin(vec![(404, "{}"), (200, "{}")]);
    let (_, v) = call(&a, "POST", "/admin/v1/keys/openai/a/test", "adm", "");
    assert_eq!(v["ok"], true);
    let kinds: Vec<_> = probes.sent.lock().iter().map(|s| s.2).collect();
    assert_eq!(kinds, [ProbeKind::Models, ProbeKind::Completion]);
    let (status, v) = call(&a, "POST", "/admin/v1/keys/openai/a/test", "adm", "");
    assert_eq!(status, 502);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("connection refused"));
}

/// An admin API over upstream `openai` (config key `a`) that adds keys to a file store in `dir`.
fn admin_with_runtime_keys(dir: &std::path::Path) -> Admin {
    use crate::config::validate::test_support::{load, source, with_top};
    use crate::key_store::{file::FileBackend, MasterKey, RuntimeKeys};
    let cfg = load(&with_top(""), &source()).unwrap();
    let clock = ManualClock::new();
    let (up, _) = crate::upstream::Upstream::build(&cfg.upstreams[0], clock.clone());
    let admin_up = AdminUpstream {
        name: up.name.clone(),
        api: "openai",
        keys: up.keys.clone(),
        activity: up.activity.clone(),
    };
    let upstreams: Arc<[crate::upstream::Upstream]> = Arc::from(vec![up]);
    let backend = Arc::new(FileBackend::new(dir.join("keys.json")));
    let runtime = RuntimeKeys::new(upstreams, MasterKey::new(&[9; 32]), backend);
    let probes = Arc::new(FakeProbes {
        answers: Mutex::new(Vec::new()),
        sent: Mutex::new(Vec::new()),
    });
    Admin::new(
        AdminAuth::new(Some(digest(b"adm")), Some(digest(b"rd"))),
        vec![admin_up],
        Vec::new(),
        Vec::new(),
        probes,
        clock,
    )
    .with_runtime_keys(Arc::new(runtime))
}

#[test]
fn keys_are_added_listed_and_removed_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let a = admin_with_runtime_keys(dir.path());
    let (status, v) = call(
        &a,
        "POST",
        "/admin/v1/keys/openai",
        "adm",
        r#"{"name":"k2","secret":"sk-live-2222","account":"org1"}"#,
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["key"]["name"], "k2");
    assert_eq!(v["key"]["source"], "runtime");
    assert_eq!(v["key"]["state"], "ready");
    assert_eq!(v["key"]["account"], "org1");
    assert!(!v.to_string().contains("sk-live"), "{v}");
    let (_, v) = call(&a, "GET", "/admin/v1/keys", "rd", "");
    let listed: Vec<(String, String)> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["name"].as_str().unwrap().into(),
                k["source"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("a".into(), "config".into()),
            ("k2".into(), "runtime".into())
        ]
    );
    let (status, v) = call(&a, "DELETE", "/admin/v1/keys/openai/k2", "adm", "");
    assert_eq!((status, &v["removed"]), (200, &serde_json::json!(true)));
    let (_, v) = call(&a, "GET", "/admin/v1/keys", "rd", "");
    assert_eq!(v["keys"].as_array().unwrap().len(), 1);
}

#[test]
fn runtime_key_mistakes_get_their_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let a = admin_with_runtime_keys(dir.path());
    let k2 = r#"{"name":"k2","secret":"sk-live-2222"}"#;
    assert_eq!(call(&a, "POST", "/admin/v1/keys/openai", "adm", k2).0, 201);
    let cases: [(&str, &str, &str, &str, u16, &str); 9] = [
        (
            "POST",
            "/admin/v1/keys/openai",
            "rd",
            k2,
            403,
            "read_only_token",
        ),
        (
            "POST",
            "/admin/v1/keys/openai",
            "adm",
            k2,
            409,
            "key_exists",
        ),
        (
            "POST",
            "/admin/v1/keys/nope",
            "adm",
            k2,
            404,
            "key_not_found",
        ),
        (
            "POST",
            "/admin/v1/keys/openai",
            "adm",
            "{nope",
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/admin/v1/keys/openai",
            "adm",
            r#"{"name":"k3"}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/admin/v1/keys/openai",
            "adm",
            r#"{"name":"bad name","secret":"sk-1"}"#,
            400,
            "invalid_key",
        ),
        (
            "DELETE",
            "/admin/v1/keys/openai/a",
            "adm",
            "",
            409,
            "key_not_changeable",
        ),
        (
            "DELETE",
            "/admin/v1/keys/openai/zz",
            "adm",
            "",
            404,
            "key_not_found",
        ),
        (
            "DELETE",
            "/admin/v1/keys/openai/k2",
            "rd",
            "",
            403,
            "read_only_token",
        ),
    ];
    for (method, path, token, body, want, code) in cases {
        let (status, v) = call(&a, method, path, token, body);
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (want, Some(code)),
            "{method} {path} {body}: {v}"
        );
    }
    // A secret in the wrong field never comes back in the answer.
    let (status, v) = call(
        &a,
        "POST",
        "/admin/v1/keys/openai",
        "adm",
        r#"{"name":"k3","weight":"sk-live-misplaced"}"#,
    );
    assert_eq!(status, 400);
    assert!(!v.to_string().contains("misplaced"), "{v}");
}

#[test]
fn adding_keys_without_runtime_keys_configured_is_refused_with_the_way_to_turn_it_on() {
    let (a, _) = admin(vec![]);
    let (status, v) = call(
        &a,
        "POST",
        "/admin/v1/keys/openai",
        "adm",
        r#"{"name":"k2","secret":"sk-live-2222"}"#,
    );
    assert_eq!(status, 409);
    assert_eq!(v["error"]["code"], "runtime_keys_off");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("admin.runtime_keys"));
    assert_eq!(
        call(&a, "DELETE", "/admin/v1/keys/openai/b", "adm", "").0,
        409
    );
}

#[test]
fn an_action_on_a_key_after_a_removed_one_answers_with_that_key() {
    let dir = tempfile::tempdir().unwrap();
    let a = admin_with_runtime_keys(dir.path());
    for name in ["k2", "k3"] {
        let body = format!(r#"{{"name":"{name}","secret":"sk-live-{name}"}}"#);
        assert_eq!(
            call(&a, "POST", "/admin/v1/keys/openai", "adm", &body).0,
            201
        );
    }
    assert_eq!(
        call(&a, "DELETE", "/admin/v1/keys/openai/k2", "adm", "").0,
        200
    );
    let (status, v) = call(&a, "POST", "/admin/v1/keys/openai/k3/disable", "adm", "");
    assert_eq!(status, 200);
    assert_eq!(v["key"]["name"], "k3");
    assert_eq!(v["key"]["state"], "disabled");
}

#[test]
fn rates_give_each_upstream_fifteen_minutes_of_requests_and_errors_to_any_token() {
    use crate::key_activity::AttemptEnd;
    let (a, _) = admin(vec![]);
    let activity = &a.upstreams[0].activity;
    activity.record(0, AttemptEnd::Answered(200));
    activity.record(1, AttemptEnd::Answered(401));
    let (status, v) = call(&a, "GET", "/admin/v1/rates", "rd", "");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["minutes"], 15);
    let up = &v["upstreams"][0];
    assert_eq!(up["name"], "openai");
    let requests = up["requests"].as_array().unwrap();
    let errors = up["errors"].as_array().unwrap();
    assert_eq!((requests.len(), errors.len()), (15, 15));
    assert_eq!((&requests[14], &errors[14]), (&2.into(), &1.into()));
    assert!(requests[..14].iter().all(|n| n == 0), "{v}");
    assert_eq!(call(&a, "GET", "/admin/v1/rates", "nope", "").0, 401);
}
