//! A small blocking W3C WebDriver client for tests that drive headless Chromium through
//! chromedriver. It speaks HTTP/1.1 over `std::net::TcpStream`, so browser tests need no async
//! runtime and no HTTP or WebDriver crate; serde_json and tempfile are the only dependencies.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::{
    fs,
    io::{self, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// The key under which WebDriver returns element references (W3C WebDriver, "web element
/// identifier"; note the final `f`).
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Socket timeout; above chromedriver's page-load and script timeouts so they report first.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);
/// Chromium's switches: `--no-sandbox` because tests run as root; the `--disable-*` networking
/// switches because Chromium otherwise stalls on refused connections to Google services (the
/// machine only has loopback).
const FLAGS: &str = "--headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage \
    --disable-quic --no-first-run --disable-background-networking --disable-component-update \
    --disable-sync --window-size=1400,1000";
/// How often `wait_for` and `wait_for_text` poll.
const POLL: Duration = Duration::from_millis(200);

/// A headless Chromium session behind a private chromedriver. Dropping it ends the session and
/// kills chromedriver and every browser process, so tests leave no orphans behind.
pub struct Browser {
    child: Child,
    port: u16,
    session: String,
    profile: tempfile::TempDir,
}

/// A reference to a DOM element, tied to its browser so it cannot outlive the session.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless Chromium session with a fresh
    /// profile. Returns `None` (with a loud SKIP line) when either binary is missing, so browser
    /// tests pass on machines without Chromium; anything else going wrong panics.
    /// `KEYWARD_CHROMEDRIVER` and `KEYWARD_CHROMIUM` override the Debian paths.
    pub fn start(test: &str) -> Option<Browser> {
        let driver = binary(test, "KEYWARD_CHROMEDRIVER", "/usr/bin/chromedriver")?;
        let chromium = binary(test, "KEYWARD_CHROMIUM", "/usr/bin/chromium")?;
        let profile = tempfile::Builder::new()
            .prefix("keyward-chromium-")
            .tempdir();
        let profile = profile.unwrap();
        let log = fs::File::create(profile.path().join("chromedriver.log")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr();
        let port = port.unwrap().port();
        let child = Command::new(&driver)
            .arg(format!("--port={port}"))
            // Crashpad handlers then keep their database in the profile, where Drop finds them.
            .env("XDG_CONFIG_HOME", profile.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", driver.display()));
        // Built before the session exists so that Drop cleans up if anything below panics.
        let session = String::new();
        let mut browser = Browser {
            child,
            port,
            session,
            profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !http(port, "GET", "/status", None).is_ok_and(|s| s["value"]["ready"] == true) {
            if let Ok(Some(status)) = browser.child.try_wait() {
                panic!("chromedriver exited with {status}:\n{}", browser.log());
            }
            if Instant::now() > deadline {
                panic!("chromedriver not ready in 20s:\n{}", browser.log());
            }
            sleep(Duration::from_millis(50));
        }
        let profile = browser.profile.path().display();
        let mut args: Vec<String> = FLAGS.split(' ').map(str::to_owned).collect();
        args.push(format!("--user-data-dir={profile}"));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
            "timeouts": {"pageLoad": 30_000, "script": 30_000},
        }}});
        let session = webdriver(port, "POST", "/session", Some(&caps))
            .unwrap_or_else(|e| panic!("cannot start Chromium: {e}\n{}", browser.log()));
        browser.session = string(&session["sessionId"]);
        Some(browser)
    }

    /// Navigates and waits for the page to load, like typing the URL into the address bar.
    pub fn goto(&self, url: &str) {
        self.cmd("POST", "url", Some(json!({ "url": url })));
    }

    /// The current URL, to assert on redirects and form submissions.
    pub fn url(&self) -> String {
        string(&self.cmd("GET", "url", None))
    }

    /// The document title, a cheap check that the right page rendered.
    pub fn title(&self) -> String {
        string(&self.cmd("GET", "title", None))
    }

    /// The serialized DOM, for assertions and failure messages.
    pub fn source(&self) -> String {
        string(&self.cmd("GET", "source", None))
    }

    /// The first element matching `css`; panics with the selector and the page source when there
    /// is none, because that is what one needs to see to fix the test.
    pub fn find(&self, css: &str) -> Element<'_> {
        self.try_find(css).unwrap_or_else(|| self.missing(css))
    }

    /// Every element matching `css`, in document order (empty when none match).
    pub fn find_all(&self, css: &str) -> Vec<Element<'_>> {
        elements(self, self.cmd("POST", "elements", Some(locator(css))))
    }

    /// The first element matching `css`, for asserting that something is absent.
    pub fn try_find(&self, css: &str) -> Option<Element<'_>> {
        self.find_all(css).into_iter().next()
    }

    /// Polls until an element matches `css`, for content that appears after navigation or
    /// script; panics with the page source after `timeout`.
    pub fn wait_for(&self, css: &str, timeout: Duration) -> Element<'_> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_find(css) {
                Some(element) => return element,
                None if Instant::now() > deadline => self.missing(&format!("{css} in {timeout:?}")),
                None => sleep(POLL),
            }
        }
    }

    /// Polls until an element matching `css` has visible text containing `text`; elements that
    /// go stale while the page changes are retried. Panics with the texts seen after `timeout`.
    pub fn wait_for_text(&self, css: &str, text: &str, timeout: Duration) -> Element<'_> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for element in self.find_all(css) {
                match self.call("GET", &format!("element/{}/text", element.id), None) {
                    Ok(Value::String(t)) if t.contains(text) => return element,
                    other => seen.push(other),
                }
            }
            if Instant::now() > deadline {
                panic!("no `{css}` contains {text:?} after {timeout:?}; saw {seen:?}");
            }
            sleep(POLL);
        }
    }

    /// Saves a PNG of the viewport, creating parent directories, to look at failures later.
    pub fn screenshot(&self, path: &Path) {
        let png = base64_decode(&string(&self.cmd("GET", "screenshot", None)));
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).unwrap();
        }
        fs::write(path, png).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    /// Resizes the window, to test responsive layouts.
    pub fn set_window_size(&self, width: u32, height: u32) {
        let rect = json!({ "width": width, "height": height });
        self.cmd("POST", "window/rect", Some(rect));
    }

    /// Runs `script` as a function body with `args` as `arguments` and returns what it returns,
    /// for the checks that have no WebDriver command.
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        let body = json!({ "script": script, "args": args });
        self.cmd("POST", "execute/sync", Some(body))
    }

    /// A session command; WebDriver errors become `Err("error: message")`.
    fn call(&self, method: &str, command: &str, body: Option<Value>) -> Result<Value, String> {
        let path = format!("/session/{}/{command}", self.session);
        webdriver(self.port, method, &path, body.as_ref())
    }

    /// A session command that must succeed.
    fn cmd(&self, method: &str, command: &str, body: Option<Value>) -> Value {
        let result = self.call(method, command, body);
        result.unwrap_or_else(|e| panic!("WebDriver {method} {command}: {e}"))
    }

    fn missing(&self, css: &str) -> ! {
        let source: String = self.source().chars().take(4000).collect();
        let url = self.url();
        panic!("no element matches `{css}` on {url}; page source (truncated):\n{source}")
    }

    /// The end of chromedriver's (and Chromium's) output, for start-up failures.
    fn log(&self) -> String {
        let log = fs::read(self.profile.path().join("chromedriver.log")).unwrap_or_default();
        String::from_utf8_lossy(&log[log.len().saturating_sub(4000)..]).into_owned()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = webdriver(
                self.port,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // By now some browser processes have been reparented to init and crashpad handlers never
        // were our descendants, but all of them name the profile in their command line. Killing
        // them also keeps zygotes from writing into the profile while it is deleted.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = processes_naming(self.profile.path());
            if left.is_empty() || Instant::now() > deadline {
                break;
            }
            let _ = Command::new("kill").arg("-KILL").args(left).status();
            sleep(Duration::from_millis(20));
        }
    }
}

impl<'a> Element<'a> {
    /// Clicks the element's centre, scrolling it into view first, as a user would.
    pub fn click(&self) {
        self.cmd("POST", "click", Some(json!({})));
    }

    /// Types `text` into the element, firing the same key events as a user typing.
    pub fn send_keys(&self, text: &str) {
        self.cmd("POST", "value", Some(json!({ "text": text })));
    }

    /// Empties an input or textarea, since `send_keys` appends.
    pub fn clear(&self) {
        self.cmd("POST", "clear", Some(json!({})));
    }

    /// The rendered text, as a user sees it (hidden text excluded).
    pub fn text(&self) -> String {
        string(&self.cmd("GET", "text", None))
    }

    /// The HTML attribute as written in the markup, `None` when absent.
    pub fn attr(&self, name: &str) -> Option<String> {
        let value = self.cmd("GET", &format!("attribute/{name}"), None);
        value.as_str().map(str::to_owned)
    }

    /// The live DOM property (e.g. an input's current `value`, `checked`), unlike `attr`.
    pub fn property(&self, name: &str) -> Value {
        self.cmd("GET", &format!("property/{name}"), None)
    }

    /// The first descendant matching `css`; panics with the page source when there is none.
    pub fn find(&self, css: &str) -> Element<'a> {
        let found = elements(
            self.browser,
            self.cmd("POST", "elements", Some(locator(css))),
        );
        found
            .into_iter()
            .next()
            .unwrap_or_else(|| self.browser.missing(css))
    }

    fn cmd(&self, method: &str, command: &str, body: Option<Value>) -> Value {
        let command = format!("element/{}/{command}", self.id);
        self.browser.cmd(method, &command, body)
    }
}

/// The path of a binary from `var` or `default`, or `None` after a SKIP line when it is missing.
fn binary(test: &str, var: &str, default: &str) -> Option<PathBuf> {
    let path = std::env::var_os(var).map_or_else(|| default.into(), PathBuf::from);
    if !path.exists() {
        eprintln!("SKIP: {test}: {} not found (set {var})", path.display());
    }
    path.exists().then_some(path)
}

fn locator(css: &str) -> Value {
    json!({ "using": "css selector", "value": css })
}

fn elements(browser: &Browser, found: Value) -> Vec<Element<'_>> {
    let Value::Array(found) = found else {
        panic!("expected elements, got {found}")
    };
    let element = |e: &Value| Element {
        browser,
        id: string(&e[ELEMENT_KEY]),
    };
    found.iter().map(element).collect()
}

fn string(value: &Value) -> String {
    let text = value.as_str().map(str::to_owned);
    text.unwrap_or_else(|| panic!("expected a string, got {value}"))
}

/// One WebDriver request: the response's `value`, or its `error: message`.
fn webdriver(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut response = http(port, method, path, body).map_err(|e| e.to_string())?;
    let value = response["value"].take();
    match value["error"].as_str() {
        Some(error) => Err(format!(
            "{error}: {}",
            value["message"].as_str().unwrap_or("")
        )),
        None => Ok(value),
    }
}

/// One HTTP/1.1 exchange returning the JSON body. chromedriver answers `Connection: close` yet
/// keeps the socket open, so the body ends where its framing says, not at EOF.
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> io::Result<Value> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    // One write: `write!` on a bare socket would send every piece of the format as a segment.
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let (mut raw, mut buf) = (Vec::new(), [0; 16 * 1024]);
    loop {
        let n = stream.read(&mut buf)?;
        raw.extend_from_slice(&buf[..n]);
        if let Some(body) = complete_body(&raw, n == 0) {
            let status = String::from_utf8_lossy(raw.split(|&b| b == b'\r').next().unwrap());
            let text = String::from_utf8_lossy(&body);
            return serde_json::from_slice(&body)
                .map_err(|e| io::Error::other(format!("{method} {path}: {status}: {e}: {text}")));
        }
        if n == 0 {
            let raw = String::from_utf8_lossy(&raw);
            return Err(io::Error::other(format!(
                "{path}: truncated response {raw:?}"
            )));
        }
    }
}

/// The body once `raw` holds a whole response (`Content-Length`, chunked, or ended by EOF).
fn complete_body(raw: &[u8], eof: bool) -> Option<Vec<u8>> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let header = |name| {
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
    };
    let body = &raw[end + 4..];
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return dechunk(body);
    }
    match header("content-length").and_then(|v| v.trim().parse::<usize>().ok()) {
        Some(len) => body.get(..len).map(<[u8]>::to_vec),
        None => eof.then(|| body.to_vec()),
    }
}

/// Joins the chunks of a chunked body; `None` until the terminating zero-size chunk arrives.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let line = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(eol + 2..eol + 2 + size)?);
        data = data.get(eol + 4 + size..)?;
    }
}

/// Standard base64 with optional padding, as WebDriver encodes screenshots.
fn base64_decode(text: &str) -> Vec<u8> {
    let (mut out, mut acc, mut bits) = (Vec::with_capacity(text.len() / 4 * 3), 0u32, 0);
    for c in text.bytes() {
        let sextet = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\r' | b'\n' => continue,
            _ => panic!("invalid base64 byte {c:#04x}"),
        };
        acc = (acc << 6 | u32::from(sextet)) & 0xffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// The pids (as kill(1) arguments) of the processes whose command line contains `path`.
fn processes_naming(path: &Path) -> Vec<String> {
    let needle = path.as_os_str().as_encoded_bytes();
    let entries = fs::read_dir("/proc").into_iter().flatten().flatten();
    let named = entries.filter_map(|entry| {
        let pid = entry.file_name().into_string().ok()?;
        pid.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
        let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
        cmdline
            .windows(needle.len())
            .any(|w| w == needle)
            .then_some(pid)
    });
    named.collect()
}
