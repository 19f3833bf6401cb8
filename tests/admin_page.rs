//! The admin status page in a real headless Chromium against the real binary: it loads, asks
//! for the token, shows every key with its state (a key the upstream refuses as disabled, a rate
//! limited one cooling with its cooldown counting down), the rate charts, a test button's answer,
//! a disable click that takes a key out of rotation (the mock never sees it again), and a key
//! added and removed through the page. Writes a screenshot (the README's docs/admin-page.png
//! when `KEYGATE_UPDATE_SCREENSHOT` is set).
#![allow(clippy::unwrap_used)]

mod utils;
use serde_json::Value;
use std::time::{Duration, Instant};
use utils::chromium::Browser;
use utils::*;

const ADMIN: &str = "adm-page-token-1234";
const READ: &str = "read-page-token-5678";
const ENV: &[(&str, &str)] = &[
    ("KA", "sk-good-aaaa"),
    ("KB", "sk-bad-bbbb"),
    ("KC", "sk-good-cccc"),
    ("KD", "sk-slow-dddd"),
    ("KG_ADMIN", ADMIN),
    ("KG_READ", READ),
    (
        "KG_MASTER",
        "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a",
    ),
];

/// Screenshot size.
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 900;

async fn keys(base: &str) -> Value {
    client()
        .get(format!("{base}/admin/v1/keys"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn state_of(keys: &Value, name: &str) -> (String, String) {
    let k = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == name)
        .unwrap();
    (
        k["state"].as_str().unwrap_or("").to_string(),
        k["reason"].as_str().unwrap_or("").to_string(),
    )
}

/// Enters `token` in the page's token form.
fn log_in(browser: &mut Browser, token: &str) {
    browser.eval(&format!(
        "document.getElementById('token').value = '{token}'; \
         document.getElementById('token-form').requestSubmit(); true"
    ));
}

/// The text of `cell` (a class) in key `name`'s row.
fn cell(browser: &mut Browser, name: &str, cell: &str) -> String {
    let v = browser.eval(&format!(
        "(() => {{ const c = document.querySelector('tr[data-key=\"mock/{name}\"] td.{cell}'); \
         return c ? c.textContent : null; }})()"
    ));
    v.as_str().unwrap_or("").to_string()
}

/// Seconds in a cooldown text such as `gpt-4o: 9m 58s`.
fn seconds(text: &str) -> u64 {
    let after = text.rsplit(": ").next().unwrap_or("");
    after.split(' ').fold(0, |total, part| {
        let (n, unit) = part.split_at(part.len().saturating_sub(1));
        let n: u64 = n.parse().unwrap_or(0);
        total
            + match unit {
                "h" => n * 3600,
                "m" => n * 60,
                _ => n,
            }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_keys_and_a_disable_click_takes_one_out_of_rotation() {
    let mock = Mock::start(&[
        "--key",
        "sk-bad-bbbb=unauthorized",
        "--key",
        "sk-slow-dddd=rate_limit:retry_after=600",
    ]);
    let port = free_port();
    let yaml = format!(
        "admin: {{ addr: \"127.0.0.1:{port}\", token_env: KG_ADMIN, read_token_env: KG_READ, runtime_keys: {{ master_key_env: KG_MASTER, path: \"{{dir}}/runtime-keys.json\" }} }}\nupstreams:\n  mock:\n    url: {}\n    keys:\n      - {{ name: a, env: KA, account: team-a }}\n      - {{ name: b, env: KB }}\n      - {{ name: c, env: KC }}\n      - {{ name: d, env: KD }}\nroutes:\n  - {{ name: chat, upstreams: [mock] }}\n",
        mock.url
    );
    let kg = Keygate::start(&yaml, ENV);
    kg.wait_for_port(port);
    let base = format!("http://127.0.0.1:{port}");

    // The page itself needs no token and carries its policy; /admin leads to it.
    let r = client().get(format!("{base}/admin/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = plain.get(format!("{base}/admin")).send().await.unwrap();
    assert_eq!(
        (
            r.status().as_u16(),
            r.headers()["location"].to_str().unwrap()
        ),
        (308, "/admin/")
    );

    // Traffic until the mock has refused b (disabled) and rate limited d (cooling).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let k = keys(&base).await;
        if state_of(&k, "b") == ("disabled".into(), "unauthorized".into())
            && state_of(&k, "d").0 == "cooling"
        {
            break;
        }
        assert!(Instant::now() < deadline, "b and d never went out: {k}");
        assert_eq!(kg.post_chat(&chat("gpt-4o")).await.status(), 200);
    }

    let mut browser = Browser::start(WIDTH, HEIGHT);
    browser.navigate(&format!("{base}/admin/"));
    browser.wait_for(
        "!document.getElementById('login').hidden && !!document.getElementById('token')",
        "the token form",
    );
    assert_eq!(
        browser.eval("document.querySelectorAll('tr[data-key]').length"),
        0,
        "no data before the token"
    );
    // A wrong token: the API's message, and the token form again.
    log_in(&mut browser, "not-the-token");
    browser.wait_for(
        "document.getElementById('status').textContent.startsWith('Invalid or missing admin token') \
         && !document.getElementById('login').hidden",
        "the wrong token's refusal",
    );
    assert_eq!(
        browser.eval("sessionStorage.getItem('keygate-admin-token')"),
        Value::Null,
        "a refused token is forgotten"
    );

    // The read-only token sees the keys, and a disable shows the API's refusal.
    log_in(&mut browser, READ);
    browser.wait_for(
        "document.querySelectorAll('tr[data-key]').length === 4",
        "the four keys",
    );
    browser.eval(
        "window.prompt = () => 'nope'; \
         document.querySelector('tr[data-key=\"mock/c\"] button[data-action=\"disable\"]').click(); true",
    );
    browser.wait_for(
        "document.getElementById('status').textContent === \
         'disable mock/c: This token may only read; key actions need the admin token.'",
        "the read-only refusal",
    );
    assert_eq!(state_of(&keys(&base).await, "c").0, "ready");
    browser.eval("document.getElementById('forget').click(); true");
    browser.wait_for(
        "!document.getElementById('login').hidden",
        "the token form after forget",
    );

    log_in(&mut browser, ADMIN);
    browser.wait_for(
        "document.querySelectorAll('tr[data-key]').length === 4 \
         && document.getElementById('status').textContent === ''",
        "the four keys",
    );
    assert_eq!(
        browser.eval("sessionStorage.getItem('keygate-admin-token')"),
        ADMIN
    );
    assert_eq!(browser.eval("localStorage.length"), 0);

    // Every key with its state.
    assert_eq!(cell(&mut browser, "a", "state"), "ready");
    assert_eq!(cell(&mut browser, "a", "account"), "team-a");
    assert_eq!(cell(&mut browser, "c", "state"), "ready");
    assert_eq!(cell(&mut browser, "b", "state"), "disabled");
    assert!(cell(&mut browser, "b", "reason").contains("unauthorized"));
    assert!(cell(&mut browser, "b", "last-error").starts_with("401 "));
    assert_eq!(cell(&mut browser, "d", "state"), "cooling");
    assert_eq!(
        browser.eval(
            "Array.from(document.querySelectorAll('tr[data-key=\"mock/b\"] button')).map(b => b.dataset.action).join(',')"
        ),
        "disable,enable,test",
        "config keys have no remove button"
    );

    // The cooldown counts down in the page, between refreshes (the refresh time stays).
    let deadline = Instant::now() + Duration::from_secs(30);
    'ticked: loop {
        let updated = browser.eval("document.getElementById('updated').textContent");
        let first = seconds(&cell(&mut browser, "d", "cooldown"));
        assert!(first > 60, "{first}");
        while browser.eval("document.getElementById('updated').textContent") == updated {
            if seconds(&cell(&mut browser, "d", "cooldown")) < first {
                break 'ticked;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            Instant::now() < deadline,
            "the cooldown did not count down between refreshes"
        );
    }

    // Filters and sorting.
    browser.eval(
        "{ const s = document.getElementById('filter-state'); s.value = 'ready'; \
         s.dispatchEvent(new Event('change')); } true",
    );
    assert_eq!(
        browser.eval(
            "Array.from(document.querySelectorAll('tr[data-key]')).map(r => r.dataset.name).join(',')"
        ),
        "a,c"
    );
    browser.eval(
        "{ const s = document.getElementById('filter-state'); s.value = ''; \
         s.dispatchEvent(new Event('change')); } \
         document.querySelector('th[data-sort=\"name\"]').click(); \
         document.querySelector('th[data-sort=\"name\"]').click(); true",
    );
    assert_eq!(
        browser.eval(
            "Array.from(document.querySelectorAll('tr[data-key]')).map(r => r.dataset.name).join(',')"
        ),
        "d,c,b,a",
        "a second click sorts descending"
    );
    browser.eval("document.querySelector('th[data-sort=\"upstream\"]').click(); true");

    // Disable a through its button, answering the reason prompt.
    browser.eval(
        "window.prompt = () => 'rotating'; \
         document.querySelector('tr[data-key=\"mock/a\"] button[data-action=\"disable\"]').click(); true",
    );
    browser.wait_for(
        "(document.querySelector('tr[data-key=\"mock/a\"] td.state') || {}).textContent === 'disabled'",
        "a to show disabled",
    );
    assert_eq!(cell(&mut browser, "a", "reason"), "manual: rotating");
    assert_eq!(
        state_of(&keys(&base).await, "a"),
        ("disabled".into(), "manual".into())
    );

    // Out of rotation: requests are served, by c alone.
    let (a_before, c_before) = (
        mock.count("sk-good-aaaa").await,
        mock.count("sk-good-cccc").await,
    );
    for _ in 0..6 {
        assert_eq!(kg.post_chat(&chat("gpt-4o")).await.status(), 200);
    }
    assert_eq!(mock.count("sk-good-aaaa").await, a_before, "a stays out");
    assert!(mock.count("sk-good-cccc").await >= c_before + 6);

    // The test button shows the probe's answer.
    browser.eval(
        "document.querySelector('tr[data-key=\"mock/c\"] button[data-action=\"test\"]').click(); true",
    );
    browser.wait_for(
        "document.getElementById('status').textContent.startsWith('test of mock/c: ok (200)')",
        "the test answer",
    );
    assert_eq!(mock.count("sk-good-aaaa").await, a_before, "a stays out");

    // A key added through the form serves; it is the only one with a remove button.
    browser.eval(
        "document.getElementById('add-upstream').value = 'mock'; \
         document.getElementById('add-name').value = 'e'; \
         document.getElementById('add-secret').value = 'sk-run-eeee'; \
         document.getElementById('add-form').requestSubmit(); true",
    );
    browser.wait_for(
        "(document.querySelector('tr[data-key=\"mock/e\"] td.state') || {}).textContent === 'ready'",
        "the added key e to show ready",
    );
    assert_eq!(
        browser.eval(
            "Array.from(document.querySelectorAll('tr[data-key=\"mock/e\"] button')).map(b => b.dataset.action).join(',')"
        ),
        "disable,test,remove"
    );
    assert_eq!(
        browser.eval("document.getElementById('add-secret').value"),
        "",
        "the secret does not stay in the form"
    );
    for _ in 0..4 {
        assert_eq!(kg.post_chat(&chat("gpt-4o")).await.status(), 200);
    }
    assert!(mock.count("sk-run-eeee").await >= 1, "the added key serves");

    // The chart shows this upstream's traffic once the page has refreshed.
    browser.wait_for(
        "(() => { const c = document.querySelector('.chart[data-upstream=\"mock\"]'); \
         return !!c && c.querySelectorAll('svg rect').length === 30 \
           && /^[1-9][0-9]* requests, [1-9][0-9]* errors/.test(c.querySelector('.sub').textContent) \
           && parseInt((document.querySelector('tr[data-key=\"mock/c\"] td.rate-1m') || {}).textContent, 10) >= 1; })()",
        "the rate chart with traffic",
    );

    let png = browser.screenshot_png();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    // Every run writes it under target/; the README's copy is refreshed on request only, so
    // that a test run leaves the work tree clean (it shows times, which differ each run).
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin-page.png");
    std::fs::write(&out, &png).unwrap();
    if std::env::var_os("KEYGATE_UPDATE_SCREENSHOT").is_some() {
        let readme_copy =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/admin-page.png");
        std::fs::write(readme_copy, &png).unwrap();
    }

    // Removing it through its button takes it out of rotation and off the page.
    browser.eval(
        "window.confirm = () => true; \
         document.querySelector('tr[data-key=\"mock/e\"] button[data-action=\"remove\"]').click(); true",
    );
    browser.wait_for(
        "!document.querySelector('tr[data-key=\"mock/e\"]')",
        "the removed key e to leave the table",
    );
    let e_before = mock.count("sk-run-eeee").await;
    for _ in 0..4 {
        assert_eq!(kg.post_chat(&chat("gpt-4o")).await.status(), 200);
    }
    assert_eq!(mock.count("sk-run-eeee").await, e_before, "e stays out");

    let profile = browser.dir();
    drop(browser);
    assert!(
        !profile.exists(),
        "the browser's temporary profile is removed"
    );
    let log = kg.log_text();
    assert!(log.contains("admin: key mock/a disabled by admin"), "{log}");
    assert!(!log.contains(ADMIN), "{log}");
}
