//! Reads a request body within limits: framing from `Content-Type`, gzip or
//! zstd decompression from `Content-Encoding`, and UTF-8.
//!
//! The decompressed size is capped while decompressing, so a gzip bomb costs
//! at most the limit in memory and is refused with 413.

use axum::body::Body;
use axum::http::{HeaderMap, header};
use futures::StreamExt;
use meterline_schemas::batch::BodyFormat;
use std::io::Read;

use meterline_http::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

/// The framing named by `Content-Type`.
pub fn format(headers: &HeaderMap) -> Result<BodyFormat, ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::unsupported_media(
            "Content-Type",
            "set Content-Type to application/json or application/x-ndjson",
        ));
    };
    let essence = value.to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(BodyFormat::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(BodyFormat::Ndjson),
        _ => Err(ApiError::unsupported_media(
            "Content-Type",
            format!("{essence:?} is not supported; use application/json or application/x-ndjson"),
        )),
    }
}

/// The compression named by `Content-Encoding`.
pub fn encoding(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else { return Ok(Encoding::Identity) };
    match value.to_str().unwrap_or("").trim().to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(Encoding::Identity),
        "gzip" | "x-gzip" => Ok(Encoding::Gzip),
        "zstd" => Ok(Encoding::Zstd),
        other => Err(ApiError::unsupported_media(
            "Content-Encoding",
            format!("{other:?} is not supported; use gzip, zstd or none"),
        )),
    }
}

/// Collects the raw body, refusing more than `limit` bytes as they arrive.
pub async fn collect(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    // Sized once from Content-Length (within the limit): growing by doubling
    // copied a large body about twice over (bench/PROFILE.md, "Ingest").
    let declared = usize::try_from(axum::body::HttpBody::size_hint(&body).lower()).unwrap_or(limit);
    let mut out = Vec::with_capacity(declared.min(limit));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ApiError::bad_request("body_read", "the request body could not be read"))?;
        if out.len() + chunk.len() > limit {
            return Err(ApiError::too_large(format!("body exceeds {limit} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Decompresses `raw` (blocking work; run it off the async threads).
pub fn decode(raw: Vec<u8>, encoding: Encoding, limit: usize) -> Result<Vec<u8>, ApiError> {
    let reader: Box<dyn Read> = match encoding {
        Encoding::Identity => return Ok(raw),
        Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(std::io::Cursor::new(raw))),
        Encoding::Zstd => match zstd::stream::read::Decoder::new(std::io::Cursor::new(raw)) {
            Ok(d) => Box::new(d),
            Err(_) => return Err(ApiError::bad_request("invalid_encoding", "body is not valid zstd")),
        },
    };
    let mut out = Vec::new();
    let name = if encoding == Encoding::Gzip { "gzip" } else { "zstd" };
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| ApiError::bad_request("invalid_encoding", format!("body is not valid {name}")))?;
    if out.len() > limit {
        return Err(ApiError::too_large(format!("decompressed body exceeds {limit} bytes")));
    }
    Ok(out)
}

/// The body as text, or a 400 naming the first invalid byte.
pub fn text(bytes: Vec<u8>) -> Result<String, ApiError> {
    String::from_utf8(bytes).map_err(|e| {
        ApiError::bad_request(
            "invalid_utf8",
            format!("body is not valid UTF-8 at byte {}", e.utf8_error().valid_up_to()),
        )
    })
}
