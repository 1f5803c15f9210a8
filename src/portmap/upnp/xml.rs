//! Just enough XML for UPnP: a device description and a SOAP answer are
//! read as a stream of start tags, end tags and text, names without their
//! namespace prefix. Attributes, processing instructions, comments and the
//! DOCTYPE are skipped; CDATA is text. Routers' XML is not always well
//! formed, so two slips are forgiven: a bare '&' (a manufacturer "A&B") is
//! text, and whatever follows the root element is not read. A router's XML
//! is small (the HTTP
//! client caps it) and the nesting is capped too, so a hostile answer
//! costs a bounded amount of work and memory.

use std::borrow::Cow;
use std::fmt;

/// Deeper nesting than any UPnP description (about 8) is refused.
pub const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// An element opens (also a self-closing one, followed by its End).
    Start(&'a str),
    End(&'a str),
    /// Character data, entities decoded; runs of whitespace alone are left out.
    Text(Cow<'a, str>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmlError(String);

impl fmt::Display for XmlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed XML: {}", self.0)
    }
}

fn error<T>(why: impl Into<String>) -> Result<T, XmlError> {
    Err(XmlError(why.into()))
}

/// The events of one document, in order; stops at the first error.
pub struct Reader<'a> {
    rest: &'a str,
    /// Names of the open elements, outermost first.
    open: Vec<&'a str>,
    /// The End of a self-closing element, given out next.
    pending_end: bool,
    done: bool,
}

impl<'a> Reader<'a> {
    pub fn new(xml: &'a str) -> Reader<'a> {
        Reader {
            rest: xml,
            open: Vec::new(),
            pending_end: false,
            done: false,
        }
    }

    /// The open elements, outermost first: after a Start, it ends with that
    /// element; after an End, the element is gone.
    pub fn path(&self) -> &[&'a str] {
        &self.open
    }

    fn step(&mut self) -> Result<Option<Event<'a>>, XmlError> {
        if self.pending_end {
            self.pending_end = false;
            let name = self.open.pop().unwrap_or_default();
            return Ok(Some(Event::End(name)));
        }
        loop {
            if self.done && self.open.is_empty() {
                // The root element is closed: what follows is not read.
                return Ok(None);
            }
            if self.rest.is_empty() {
                if let Some(name) = self.open.last() {
                    return error(format!("<{name}> is never closed"));
                }
                return Ok(None);
            }
            let Some(tail) = self.rest.strip_prefix('<') else {
                let end = self.rest.find('<').unwrap_or(self.rest.len());
                let (raw, rest) = self.rest.split_at(end);
                self.rest = rest;
                if raw.trim().is_empty() {
                    continue;
                }
                if self.open.is_empty() {
                    return error("text outside the root element");
                }
                return Ok(Some(Event::Text(decode(raw))));
            };
            if let Some(t) = tail.strip_prefix("![CDATA[") {
                let (text, rest) = split_once(t, "]]>", "CDATA section")?;
                self.rest = rest;
                if text.is_empty() {
                    continue;
                }
                if self.open.is_empty() {
                    return error("CDATA outside the root element");
                }
                return Ok(Some(Event::Text(Cow::Borrowed(text))));
            }
            if let Some(t) = tail.strip_prefix("!--") {
                self.rest = split_once(t, "-->", "comment")?.1;
                continue;
            }
            if let Some(t) = tail.strip_prefix('?') {
                self.rest = split_once(t, "?>", "processing instruction")?.1;
                continue;
            }
            if let Some(t) = tail.strip_prefix('!') {
                // DOCTYPE; an internal subset with '>' inside is not UPnP's.
                self.rest = split_once(t, ">", "declaration")?.1;
                continue;
            }
            if let Some(t) = tail.strip_prefix('/') {
                let (tag, rest) = split_once(t, ">", "end tag")?;
                self.rest = rest;
                let name = local_name(tag.trim_end())?;
                return match self.open.pop() {
                    Some(open) if open == name => Ok(Some(Event::End(name))),
                    Some(open) => error(format!("</{name}> closes <{open}>")),
                    None => error(format!("</{name}> closes nothing")),
                };
            }
            let (tag, rest) = start_tag(tail)?;
            self.rest = rest;
            let (tag, self_closing) = match tag.strip_suffix('/') {
                Some(t) => (t, true),
                None => (tag, false),
            };
            let name_end = tag.find(|c: char| c.is_ascii_whitespace()).unwrap_or(tag.len());
            let name = local_name(&tag[..name_end])?;
            if self.open.len() == MAX_DEPTH {
                return error(format!("nested deeper than {MAX_DEPTH} elements"));
            }
            self.open.push(name);
            self.done = true;
            self.pending_end = self_closing;
            return Ok(Some(Event::Start(name)));
        }
    }
}

impl<'a> Iterator for Reader<'a> {
    type Item = Result<Event<'a>, XmlError>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.step().transpose();
        if let Some(Err(_)) = item {
            // Nothing after an error.
            self.rest = "";
            self.open.clear();
            self.pending_end = false;
        }
        item
    }
}

fn split_once<'a>(s: &'a str, end: &str, what: &str) -> Result<(&'a str, &'a str), XmlError> {
    match s.find(end) {
        Some(i) => Ok((&s[..i], &s[i + end.len()..])),
        None => error(format!("unterminated {what}")),
    }
}

/// The inside of a start tag (name and attributes) and what follows its
/// '>'; a '>' inside a quoted attribute value does not end it.
fn start_tag(s: &str) -> Result<(&str, &str), XmlError> {
    let mut quote = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (None, '>') => return Ok((&s[..i], &s[i + 1..])),
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '<') => return error("'<' inside a tag"),
            _ => {}
        }
    }
    error("unterminated start tag")
}

/// `u:AddPortMappingResponse` -> `AddPortMappingResponse`.
fn local_name(qualified: &str) -> Result<&str, XmlError> {
    let name = qualified.rsplit(':').next().unwrap_or_default();
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid {
        Ok(name)
    } else {
        error(format!("bad element name {:?}", truncate(qualified)))
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Longest entity reference looked for after a '&' (`&#x10FFFF;`).
const MAX_ENTITY: usize = 10;

/// Character data with its entity and character references replaced; a
/// '&' that starts none is kept as it is.
pub fn decode(raw: &str) -> Cow<'_, str> {
    if !raw.contains('&') {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp + 1..];
        let window = &rest.as_bytes()[..rest.len().min(MAX_ENTITY)];
        let reference = window
            .iter()
            .position(|b| *b == b';')
            .and_then(|end| Some((entity(&rest[..end])?, end)));
        match reference {
            Some((c, end)) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => out.push('&'),
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// The character `&NAME;` stands for.
fn entity(name: &str) -> Option<char> {
    Some(match name {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "quot" => '"',
        "apos" => '\'',
        _ => {
            let code = match name.strip_prefix("#x").or_else(|| name.strip_prefix("#X")) {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => name.strip_prefix('#').and_then(|d| d.parse().ok()),
            };
            return code.and_then(char::from_u32);
        }
    })
}

/// `text` safe inside an element or an attribute value.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.contains(['<', '>', '&', '"', '\'']) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Every event of `xml`, or its first error; for the fuzz target, which also
/// checks that what is read back from escaped text is that text.
pub fn fuzz_read(xml: &str) -> bool {
    for event in Reader::new(xml) {
        match event {
            Err(_) => return false,
            Ok(Event::Text(t)) => assert_eq!(decode(&escape(&t)), t),
            Ok(_) => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(xml: &str) -> Result<Vec<Event<'_>>, XmlError> {
        Reader::new(xml).collect()
    }

    #[test]
    fn reads_a_soap_answer() {
        let xml = "<?xml version=\"1.0\"?>\r\n<!-- hi --><s:Envelope xmlns:s=\"a>b\" s:x='1'>\
                   <s:Body><u:R xmlns:u=\"urn\"><A>1 &amp; 2</A><B/><C><![CDATA[<x>]]></C>\
                   </u:R></s:Body></s:Envelope>\n";
        use Event::*;
        assert_eq!(
            events(xml).unwrap(),
            vec![
                Start("Envelope"),
                Start("Body"),
                Start("R"),
                Start("A"),
                Text("1 & 2".into()),
                End("A"),
                Start("B"),
                End("B"),
                Start("C"),
                Text("<x>".into()),
                End("C"),
                End("R"),
                End("Body"),
                End("Envelope"),
            ]
        );
    }

    #[test]
    fn what_follows_the_root_is_not_read() {
        use Event::*;
        for xml in ["<a/><b/>", "<a></a>tail", "<a/>\0\0", "<a/></a>"] {
            assert_eq!(events(xml).unwrap(), vec![Start("a"), End("a")], "{xml:?}");
        }
    }

    #[test]
    fn path_follows_the_nesting() {
        let mut r = Reader::new("<a><b><c/></b></a>");
        let mut paths = Vec::new();
        while let Some(e) = r.next() {
            e.unwrap();
            paths.push(r.path().join("/"));
        }
        assert_eq!(paths, ["a", "a/b", "a/b/c", "a/b", "a", ""]);
    }

    #[test]
    fn refuses_what_is_not_well_formed() {
        for bad in [
            "<a>",
            "<a></b>",
            "</a>",
            "<a><b></a>",
            "<a x=\"1>",
            "<a><!-- x</a>",
            "<a><![CDATA[x</a>",
            "text<a/>",
            "<a b<c>",
            "<:>x</:>",
        ] {
            assert!(events(bad).is_err(), "{bad:?}");
        }
        let deep = "<a>".repeat(MAX_DEPTH + 1);
        let err = events(&deep).unwrap_err();
        assert!(err.to_string().contains("deeper"), "{err}");
        assert!(events(&"<a>".repeat(MAX_DEPTH)).is_err()); // never closed
    }

    #[test]
    fn entities_round_trip() {
        assert_eq!(decode("&#65;&#x42;&lt;&gt;&quot;&apos;&amp;"), "AB<>\"'&");
        let s = "a<b>&\"c'd é";
        assert_eq!(decode(&escape(s)), s);
        // Slips routers make: kept as written.
        for raw in ["AT&T", "&bogus;", "&#xD800;", "&amp", "a & b;", "&"] {
            assert_eq!(decode(raw), raw);
        }
        assert_eq!(decode("&amp;amp;"), "&amp;");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert!(fuzz_read("<a>x &lt; y</a>"));
        assert!(!fuzz_read("<a>"));
    }
}
