//! Reading one event's members out of the JSON text, borrowing from it
//! wherever no escape forces a copy: the hot path of ingest
//! (bench/PROFILE.md, "Ingest").

use chrono::{DateTime, Utc};
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

use super::{Builder, ErrorCode, FieldError, Rejection, TimeBounds, UsageEvent};

/// A member's name, borrowed from the body unless it holds an escape: an
/// owned `String` per member was ingest's largest avoidable cost per event
/// (bench/PROFILE.md, "Ingest").
struct Name<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Name<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for NameVisitor<'a> {
            type Value = Name<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(NameVisitor(std::marker::PhantomData))
    }
}

/// Reads one event object's members straight into a [`Builder`], in the
/// order sent, values unparsed (no list of members in between).
pub(super) struct Fill<'b, 'a>(pub(super) &'b mut Builder<'a>);

impl<'de: 'a, 'a> DeserializeSeed<'de> for Fill<'_, 'a> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for Fill<'_, 'a> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(Name(key)) = map.next_key::<Name<'a>>()? {
            let value: &'a RawValue = map.next_value()?;
            self.0.member(&key, value);
        }
        Ok(())
    }
}

/// One element of a batch array, parsed where it lies in the body (see
/// [`crate::batch::parse_array`]): an object's members go straight to a
/// [`Builder`]; any other value is skimmed and refused as not an object, as
/// [`super::parse_event`] refuses it given the element's text.
pub(crate) struct EventSeed<'t> {
    pub bounds: &'t TimeBounds,
    pub now: DateTime<Utc>,
}

impl EventSeed<'_> {
    fn not_an_object<E>(&self) -> Result<Result<UsageEvent, Rejection>, E> {
        Ok(Err(Rejection {
            idempotency_key: None,
            errors: vec![FieldError::new("", ErrorCode::NotAnObject, "an event must be a JSON object")],
        }))
    }
}

impl<'de> DeserializeSeed<'de> for EventSeed<'_> {
    type Value = Result<UsageEvent, Rejection>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for EventSeed<'_> {
    type Value = Result<UsageEvent, Rejection>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a usage event")
    }
    fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Self::Value, M::Error> {
        let mut builder = Builder::default();
        Fill(&mut builder).visit_map(map)?;
        Ok(builder.build(self.bounds, self.now))
    }
    fn visit_seq<S: de::SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
        // Elements are skimmed, not built, so nesting costs no stack.
        while seq.next_element::<&'de RawValue>()?.is_some() {}
        self.not_an_object()
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        self.not_an_object()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        self.not_an_object()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        self.not_an_object()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        self.not_an_object()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        self.not_an_object()
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.not_an_object()
    }
}

/// The text of a JSON string value: borrowed when it holds no escape (the
/// value was already checked while the event's members were read: closed,
/// no raw control character), decoded by serde_json otherwise. `None` when
/// the value is not a string.
pub(super) fn string_of(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => Some(Cow::Borrowed(inner)),
        _ => serde_json::from_str::<String>(text).ok().map(Cow::Owned),
    }
}
