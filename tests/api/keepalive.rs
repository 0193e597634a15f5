//! `SSE_KEEPALIVE_SECS`: comment lines while an SSE answer is silent, only between events, and
//! nothing added with the setting off.

use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::helpers::*;

const KEEPALIVE: &str = ": keepalive\n";

/// The upstream's stream: an event with `id:`, 2.5 s of silence, half an event, 2.5 s of silence
/// inside it, its end, `[DONE]`.
const SCRIPT: [(u64, &str); 4] = [
    (0, "id: 1\ndata: {\"n\":1}\n\n"),
    (2500, "id: 2\ndata: {\"n\""),
    (2500, ":2}\n\n"),
    (0, "data: [DONE]\n\n"),
];

async fn scripted_sse_upstream() -> String {
    let (target, _) = spawn_raw_upstream(|mut socket| async move {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                    transfer-encoding: chunked\r\n\r\n";
        socket.write_all(head.as_bytes()).await.unwrap();
        for (pause, data) in SCRIPT {
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let chunk = format!("{:x}\r\n{data}\r\n", data.len());
            socket.write_all(chunk.as_bytes()).await.unwrap();
        }
        socket.write_all(b"0\r\n\r\n").await.unwrap();
    })
    .await;
    target
}

/// Every chunk the client received, with the time since the request was sent.
async fn receive(app: &TestApp) -> Vec<(Duration, String)> {
    let started = Instant::now();
    let response = app.stream_chat(1, 1).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut chunks = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = String::from_utf8(chunk.unwrap().to_vec()).unwrap();
        chunks.push((started.elapsed(), chunk));
    }
    chunks
}

/// What an SSE client makes of a stream (the WHATWG rules): events as (id, data), and the
/// comment lines it skipped.
fn parse_sse(text: &str) -> (Vec<(Option<String>, String)>, Vec<String>) {
    let (mut events, mut comments) = (Vec::new(), Vec::new());
    let (mut id, mut data): (Option<String>, Option<String>) = (None, None);
    for line in text.split_terminator('\n') {
        if line.is_empty() {
            // A blank line dispatches what was gathered; openai-python also dispatches when
            // nothing was (an empty event), which is what a blank line after a comment causes.
            assert!(
                data.is_some() || id.is_none(),
                "a blank line with nothing to dispatch after id: {text:?}"
            );
            if let Some(data) = data.take() {
                events.push((id.clone(), data));
            }
        } else if let Some(comment) = line.strip_prefix(':') {
            comments.push(comment.trim().to_string());
        } else if let Some(value) = line.strip_prefix("data: ") {
            data = Some(value.to_string());
        } else if let Some(value) = line.strip_prefix("id: ") {
            id = Some(value.to_string());
        } else {
            panic!("unexpected line {line:?} in {text:?}");
        }
    }
    (events, comments)
}

#[tokio::test]
async fn a_silent_stream_gets_comment_lines_between_events_only() {
    let target = scripted_sse_upstream().await;
    let app = spawn_app(&[("TARGET_HOST", &target), ("SSE_KEEPALIVE_SECS", "1")]).await;
    let chunks = receive(&app).await;
    let text: String = chunks.iter().map(|(_, chunk)| chunk.as_str()).collect();

    let (events, comments) = parse_sse(&text);
    assert_eq!(
        events,
        [
            (Some("1".into()), "{\"n\":1}".into()),
            (Some("2".into()), "{\"n\":2}".into()),
            (Some("2".into()), "[DONE]".into()),
        ]
    );
    assert_eq!(comments, ["keepalive", "keepalive"], "{chunks:?}");
    // Both in the 2.5 s silence after the first event, about a second apart; none during the
    // silence inside the second event.
    let upstream: String = SCRIPT.iter().map(|(_, data)| *data).collect();
    let expected = upstream.replacen("\n\nid: 2", &format!("\n\n{KEEPALIVE}{KEEPALIVE}id: 2"), 1);
    assert_eq!(
        text, expected,
        "nothing else added, nothing inside an event"
    );
    let times: Vec<Duration> = chunks
        .iter()
        .filter(|(_, chunk)| chunk == KEEPALIVE)
        .map(|(at, _)| *at)
        .collect();
    assert!(
        times[0] >= Duration::from_millis(900) && times[0] < Duration::from_millis(1800),
        "{times:?}"
    );
    assert!(
        times[1] - times[0] >= Duration::from_millis(900),
        "{times:?}"
    );
}

#[tokio::test]
async fn with_keepalive_off_the_stream_is_the_upstreams_bytes() {
    let target = scripted_sse_upstream().await;
    let app = spawn_app(&[("TARGET_HOST", &target)]).await;
    let text: String = receive(&app)
        .await
        .into_iter()
        .map(|(_, chunk)| chunk)
        .collect();
    let upstream: String = SCRIPT.iter().map(|(_, data)| *data).collect();
    assert_eq!(text, upstream);
}

#[tokio::test]
async fn keepalives_are_not_added_to_error_answers_or_json() {
    let app = spawn_app(&[("SSE_KEEPALIVE_SECS", "1")]).await;
    let response = app
        .stream_chat(1, 1)
        .header("x-mock-status", "500")
        .header("x-mock-delay-ms", "1500")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    assert!(!response.text().await.unwrap().contains("keepalive"));
}
