//! UPnP control (UDA 1.1, section 3): an action is a SOAP envelope POSTed
//! to the service's control URL; the answer is the action's out arguments
//! (HTTP 200) or a UPnPError fault with a code (HTTP 500).

use super::CallError;
use super::http::{Answer, shorten};
use super::xml::{self, Event, Reader};

/// Out arguments kept from one answer: GetGenericPortMappingEntry has 8.
const MAX_ARGUMENTS: usize = 16;
/// An argument value longer than this is cut: none we read is near it.
const MAX_VALUE: usize = 256;
// Codes that mean the action is not there to call (UDA 1.1 table 3-3).
const INVALID_ACTION: u16 = 401;
const OPTIONAL_ACTION_NOT_IMPLEMENTED: u16 = 602;

/// The body POSTed for `action` of `service` with `args` (name, value).
pub fn envelope(service: &str, action: &str, args: &[(&str, String)]) -> String {
    let mut body = format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
         <u:{action} xmlns:u=\"{service}\">"
    );
    for (name, value) in args {
        body.push_str(&format!("<{name}>{}</{name}>", xml::escape(value)));
    }
    body.push_str(&format!("</u:{action}></s:Body></s:Envelope>\r\n"));
    body
}

/// The SOAPAction header's value.
pub fn action_header(service: &str, action: &str) -> String {
    format!("\"{service}#{action}\"")
}

/// The out arguments of `action`'s answer, or why there are none.
pub(super) fn parse_answer(action: &str, answer: &Answer) -> Result<Vec<(String, String)>, CallError> {
    let text = std::str::from_utf8(&answer.body)
        .map_err(|_| CallError::Other(format!("HTTP {}: the body is not UTF-8", answer.status)))?;
    match answer.status {
        200 => arguments(action, text),
        500 => match fault(text) {
            Some((INVALID_ACTION | OPTIONAL_ACTION_NOT_IMPLEMENTED, _)) => Err(CallError::Unsupported),
            Some((code, description)) => Err(CallError::Upnp(code, description)),
            None => Err(CallError::Other(format!(
                "HTTP 500 without a UPnP error: {:?}",
                shorten(text.trim())
            ))),
        },
        // Some routers answer an action they do not know with an HTTP error.
        401 | 404 | 405 | 501 => Err(CallError::Unsupported),
        status => Err(CallError::Other(format!("HTTP {status}"))),
    }
}

/// The children of `<u:ACTIONResponse>`, as (name, text).
fn arguments(action: &str, text: &str) -> Result<Vec<(String, String)>, CallError> {
    let unreadable = |why: String| CallError::Other(format!("unreadable {action} answer: {why}"));
    let response = format!("{action}Response");
    let mut reader = Reader::new(text);
    let mut inside = None;
    let mut found = false;
    let mut args = Vec::new();
    let mut value = String::new();
    while let Some(event) = reader.next() {
        match event.map_err(|e| unreadable(e.to_string()))? {
            Event::Start(name) if name == response && inside.is_none() => {
                inside = Some(reader.path().len());
                found = true;
            }
            Event::Start(_) => value.clear(),
            Event::Text(t) => {
                if value.len() < MAX_VALUE {
                    value.push_str(&t);
                }
            }
            Event::End(name) => match inside {
                Some(depth) if reader.path().len() + 1 == depth => inside = None,
                Some(depth) if reader.path().len() == depth && args.len() < MAX_ARGUMENTS => {
                    let v = std::mem::take(&mut value);
                    let v: String = v.trim().chars().take(MAX_VALUE).collect();
                    args.push((name.to_string(), v));
                }
                _ => value.clear(),
            },
        }
    }
    if !found {
        return Err(unreadable(format!("no {response}")));
    }
    Ok(args)
}

/// errorCode and errorDescription of a UPnPError, wherever it sits.
fn fault(text: &str) -> Option<(u16, String)> {
    let mut reader = Reader::new(text);
    let mut code = None;
    let mut description = String::new();
    let mut value = String::new();
    while let Some(Ok(event)) = reader.next() {
        match event {
            Event::Start(_) => value.clear(),
            Event::Text(t) if value.len() < MAX_VALUE => value.push_str(&t),
            Event::Text(_) => {}
            Event::End("errorCode") => code = value.trim().parse().ok(),
            Event::End("errorDescription") => description = shorten(value.trim()).to_string(),
            Event::End(_) => {}
        }
    }
    code.map(|c| (c, description))
}

/// The value of out argument `name`, or why it is missing.
pub(super) fn argument<'a>(
    args: &'a [(String, String)],
    action: &str,
    name: &str,
) -> Result<&'a str, CallError> {
    args.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| CallError::Other(format!("{action} answer without {name}")))
}

/// For the fuzz target: an answer with any status and body never panics.
pub fn fuzz_parse(data: &[u8]) -> bool {
    let Some((&first, body)) = data.split_first() else {
        return false;
    };
    let status = [200, 500, 404, 302][usize::from(first) % 4];
    let answer = Answer {
        status,
        body: body.to_vec(),
    };
    parse_answer("GetGenericPortMappingEntry", &answer).is_ok()
}

#[cfg(test)]
mod tests {
    use super::super::http::parse_answer as parse_http;
    use super::*;

    /// An answer as miniupnpd sent it (see fixtures/capture.sh).
    fn fixture(name: &str) -> Answer {
        let path = format!(
            "{}/src/portmap/upnp/fixtures/soap-{name}.http",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        parse_http(&bytes, true).unwrap().unwrap()
    }

    fn args(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_miniupnpds_answers() {
        assert_eq!(
            parse_answer("GetExternalIPAddress", &fixture("external-ip")),
            Ok(args(&[("NewExternalIPAddress", "198.51.100.20")]))
        );
        assert_eq!(parse_answer("AddPortMapping", &fixture("add")), Ok(vec![]));
        assert_eq!(parse_answer("DeletePortMapping", &fixture("delete")), Ok(vec![]));
        let entry = parse_answer("GetGenericPortMappingEntry", &fixture("entry")).unwrap();
        assert_eq!(argument(&entry, "x", "NewExternalPort"), Ok("40000"));
        assert_eq!(argument(&entry, "x", "NewInternalClient"), Ok("10.1.0.2"));
        assert_eq!(argument(&entry, "x", "NewRemoteHost"), Ok(""));
        assert_eq!(entry.len(), 8);
        assert!(argument(&entry, "x", "Nope").is_err());
    }

    #[test]
    fn reads_miniupnpds_errors() {
        assert_eq!(
            parse_answer("AddPortMapping", &fixture("add-conflict")),
            Err(CallError::Upnp(718, "ConflictInMappingEntry".into()))
        );
        assert_eq!(
            parse_answer("GetGenericPortMappingEntry", &fixture("entry-past-end")),
            Err(CallError::Upnp(713, "SpecifiedArrayIndexInvalid".into()))
        );
        assert_eq!(
            parse_answer("NoSuchAction", &fixture("invalid-action")),
            Err(CallError::Unsupported)
        );
    }

    #[test]
    fn odd_answers_are_other_errors() {
        let answer = |status, body: &str| Answer {
            status,
            body: body.as_bytes().to_vec(),
        };
        let other = |r: Result<_, CallError>| matches!(r, Err(CallError::Other(_)));
        assert!(other(parse_answer("X", &answer(200, "<a><XResponse2/></a>"))));
        assert!(other(parse_answer("X", &answer(200, "<a><XResponse>"))));
        assert!(other(parse_answer("X", &answer(500, "oops"))));
        assert!(other(parse_answer("X", &answer(302, ""))));
        assert_eq!(parse_answer("X", &answer(404, "")), Err(CallError::Unsupported));
        assert!(other(parse_answer(
            "X",
            &Answer {
                status: 200,
                body: vec![0xff]
            }
        )));
        // Nested elements inside an argument do not become arguments.
        let nested = "<e><b><XResponse><A>1</A><B><C>2</C></B></XResponse></b></e>";
        assert_eq!(
            parse_answer("X", &answer(200, nested)),
            Ok(args(&[("A", "1"), ("B", "")]))
        );
        assert!(!fuzz_parse(b"\x00<XResponse/>"));
    }

    #[test]
    fn envelope_escapes_values() {
        let body = envelope(
            "urn:x:1",
            "AddPortMapping",
            &[("NewPortMappingDescription", "a<b>&c".into())],
        );
        assert!(body.contains("<u:AddPortMapping xmlns:u=\"urn:x:1\">"), "{body}");
        assert!(body.contains("<NewPortMappingDescription>a&lt;b&gt;&amp;c</NewPortMappingDescription>"));
        assert!(Reader::new(&body).all(|e| e.is_ok()));
        assert_eq!(action_header("urn:x:1", "A"), "\"urn:x:1#A\"");
    }
}
