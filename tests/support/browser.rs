//! Headless Chromium driven over the Chrome DevTools Protocol, for tests of the sandbox's phones
//! page. Chromium comes from the system's packages (`scripts/install-deps --browser`); the
//! protocol runs over a WebSocket, spoken here directly (a handful of frames is all a test needs).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A headless Chromium showing one page; killed on drop.
pub struct Browser {
    child: Child,
    profile: PathBuf,
    port: u16,
}

fn chromium_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("GRIDTALK_CHROMIUM") {
        return PathBuf::from(path);
    }
    for candidate in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let path = dir.join(candidate);
            if path.is_file() {
                return path;
            }
        }
    }
    panic!("no Chromium found: run scripts/install-deps --browser (or set GRIDTALK_CHROMIUM)");
}

impl Browser {
    /// Starts headless Chromium on `url` with a fresh profile and a DevTools port of its choosing.
    pub fn launch(url: &str) -> Browser {
        let profile =
            std::env::temp_dir().join(format!("gridtalk-chromium-{}", super::unique("p")));
        std::fs::create_dir_all(&profile).expect("profile dir");
        let child = Command::new(chromium_binary())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Chromium starts");
        // Chromium writes the port it bound to the profile's DevToolsActivePort file.
        let started = Instant::now();
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(profile.join("DevToolsActivePort")) {
                if let Some(port) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                    break port;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "Chromium did not open its DevTools port"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        Browser {
            child,
            profile,
            port,
        }
    }

    /// A DevTools session on the page.
    pub async fn page(&self) -> Cdp {
        let started = Instant::now();
        loop {
            let list: Value = reqwest::get(format!("http://127.0.0.1:{}/json/list", self.port))
                .await
                .expect("DevTools answers")
                .json()
                .await
                .expect("target list");
            let page = list.as_array().and_then(|targets| {
                targets
                    .iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                    .map(String::from)
            });
            if let Some(ws) = page {
                return Cdp::connect(&ws).await;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no page target"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// One DevTools WebSocket session.
pub struct Cdp {
    stream: TcpStream,
    next_id: u64,
}

impl Cdp {
    async fn connect(ws_url: &str) -> Cdp {
        let rest = ws_url.strip_prefix("ws://").expect("ws URL");
        let (host, path) = rest.split_once('/').expect("ws path");
        let mut stream = TcpStream::connect(host).await.expect("DevTools socket");
        let request = format!(
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("handshake");
        let mut answer = Vec::new();
        while !answer.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream
                .read_exact(&mut byte)
                .await
                .expect("handshake answer");
            answer.push(byte[0]);
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
        Cdp { stream, next_id: 1 }
    }

    async fn send_frame(&mut self, payload: &[u8]) {
        let mut frame = vec![0x81u8];
        let len = payload.len();
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else if len < 65_536 {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
        // Clients mask every frame; the key need not be secret for a local test.
        let mask = [0x5a, 0x17, 0xc3, 0x9e];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.expect("frame sent");
    }

    /// Reads one whole text message (continuation frames joined).
    async fn read_message(&mut self) -> Vec<u8> {
        let mut message = Vec::new();
        loop {
            let mut head = [0u8; 2];
            self.stream.read_exact(&mut head).await.expect("frame head");
            let fin = head[0] & 0x80 != 0;
            let opcode = head[0] & 0x0f;
            let mut len = (head[1] & 0x7f) as u64;
            if len == 126 {
                let mut ext = [0u8; 2];
                self.stream.read_exact(&mut ext).await.expect("length");
                len = u16::from_be_bytes(ext) as u64;
            } else if len == 127 {
                let mut ext = [0u8; 8];
                self.stream.read_exact(&mut ext).await.expect("length");
                len = u64::from_be_bytes(ext);
            }
            let mut payload = vec![0u8; len as usize];
            self.stream.read_exact(&mut payload).await.expect("payload");
            match opcode {
                0x8 => panic!("DevTools closed the session"),
                0x9 | 0xa => continue,
                _ => message.extend_from_slice(&payload),
            }
            if fin {
                return message;
            }
        }
    }

    /// Calls a DevTools method and returns its result, skipping the events in between.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"id": id, "method": method, "params": params}).to_string();
        self.send_frame(request.as_bytes()).await;
        loop {
            let message: Value =
                serde_json::from_slice(&self.read_message().await).expect("DevTools JSON");
            if message["id"] == id {
                if let Some(error) = message.get("error") {
                    panic!("{method}: {error}");
                }
                return message["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    pub async fn evaluate(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until it yields `true`, failing with `what` after `deadline`.
    pub async fn wait_for(&mut self, what: &str, deadline: Duration, expression: &str) {
        let started = Instant::now();
        while self.evaluate(expression).await != Value::Bool(true) {
            assert!(
                started.elapsed() < deadline,
                "timed out waiting for the page to show {what}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
