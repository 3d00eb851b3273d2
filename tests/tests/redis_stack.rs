//! The stack's Redis: a private server keeps an acknowledged write across a
//! SIGKILL (AOF with an fsync per write), spoken to in raw RESP.

use meterline_tests::stack::Redis;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends one command as a RESP array of bulk strings and returns the raw reply
/// (one line, or a bulk string's header line and body).
async fn command(addr: &str, args: &[&str]) -> String {
    let mut request = format!("*{}\r\n", args.len());
    for a in args {
        request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    let mut stream = TcpStream::connect(addr).await.expect("connect to redis");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut reply = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let n = stream.read(&mut buf).await.expect("read reply");
        assert!(n > 0, "redis closed the connection after {reply:?}");
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        let Some(first) = text.find("\r\n") else { continue };
        // A bulk string `$LEN\r\nBODY\r\n` is complete once its body is in; `$-1` and every other type are one line.
        match text[..first].strip_prefix('$').and_then(|l| l.parse::<usize>().ok()) {
            Some(len) if reply.len() < first + 2 + len + 2 => continue,
            _ => return text.into_owned(),
        }
    }
}

#[tokio::test]
async fn a_write_survives_sigkill_and_restart() {
    let mut redis = Redis::private().await;
    assert!(redis.url().starts_with("redis://127.0.0.1:"));
    let addr = redis.addr();
    let value = format!("credits-{}", std::process::id());
    assert_eq!(command(&addr, &["SET", "meterline:test:key", &value]).await, "+OK\r\n");
    assert_eq!(command(&addr, &["CONFIG", "GET", "appendfsync"]).await, "*2\r\n$11\r\nappendfsync\r\n$6\r\nalways\r\n");

    redis.kill().await;
    assert!(TcpStream::connect(&addr).await.is_err(), "redis still listens after SIGKILL");
    redis.restart().await;

    assert_eq!(redis.addr(), addr, "restart keeps the port");
    assert_eq!(command(&addr, &["GET", "meterline:test:key"]).await, format!("${}\r\n{value}\r\n", value.len()));
    assert!(redis.dir().join("appendonlydir").is_dir(), "the AOF is in the data dir");

    // restart() also SIGKILLs a running server itself.
    assert_eq!(command(&addr, &["INCR", "meterline:test:counter"]).await, ":1\r\n");
    redis.restart().await;
    assert_eq!(command(&addr, &["GET", "meterline:test:counter"]).await, "$1\r\n1\r\n");
}
