//! The request writer: one vim25 request envelope, written in call order.

use std::fmt::Write as _;

use super::reader::Node;

/// Escapes text for element content and attribute values.
pub fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot carry at all are dropped rather than
            // producing a document the server rejects as a whole.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
}

/// Writes one request envelope. Elements are written in call order; the
/// caller is responsible for vim25's element order.
pub struct Envelope {
    buf: String,
    method: &'static str,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = f.debug_struct("Envelope");
        out.field("method", &self.method);
        // A Login body holds the password.
        if self.method == "Login" {
            out.field("body", &"<redacted>");
        } else {
            out.field("body", &self.buf);
        }
        out.finish()
    }
}

impl Envelope {
    /// Starts the request of `method` (e.g. `RetrievePropertiesEx`).
    pub fn new(method: &'static str) -> Self {
        let mut buf = String::with_capacity(512);
        buf.push_str(concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" "#,
            r#"xmlns:xsd="http://www.w3.org/2001/XMLSchema" "#,
            r#"xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>"#
        ));
        buf.push('<');
        buf.push_str(method);
        buf.push_str(r#" xmlns="urn:vim25">"#);
        Self { buf, method }
    }

    /// The method this envelope calls.
    pub fn method(&self) -> &'static str {
        self.method
    }

    /// `<tag type="Kind">value</tag>`: a managed object reference.
    pub fn moref(&mut self, tag: &str, kind: &str, value: &str) -> &mut Self {
        let _ = write!(self.buf, "<{tag} type=\"");
        escape_into(&mut self.buf, kind);
        self.buf.push_str("\">");
        escape_into(&mut self.buf, value);
        let _ = write!(self.buf, "</{tag}>");
        self
    }

    /// `<tag>text</tag>`.
    pub fn text(&mut self, tag: &str, text: &str) -> &mut Self {
        let _ = write!(self.buf, "<{tag}>");
        escape_into(&mut self.buf, text);
        let _ = write!(self.buf, "</{tag}>");
        self
    }

    /// `<tag xsi:type="ty">text</tag>`.
    pub fn typed_text(&mut self, tag: &str, ty: &str, text: &str) -> &mut Self {
        let _ = write!(self.buf, "<{tag} xsi:type=\"{ty}\">");
        escape_into(&mut self.buf, text);
        let _ = write!(self.buf, "</{tag}>");
        self
    }

    /// Opens `<tag>`.
    pub fn open(&mut self, tag: &str) -> &mut Self {
        let _ = write!(self.buf, "<{tag}>");
        self
    }

    /// Opens `<tag xsi:type="ty">`.
    pub fn open_typed(&mut self, tag: &str, ty: &str) -> &mut Self {
        let _ = write!(self.buf, "<{tag} xsi:type=\"{ty}\">");
        self
    }

    /// Closes `</tag>`.
    pub fn close(&mut self, tag: &str) -> &mut Self {
        let _ = write!(self.buf, "</{tag}>");
        self
    }

    /// Writes an element read from a response back out, with its `xsi:type`
    /// and managed-object `type`: this is how devices are edited "as read".
    pub fn node(&mut self, node: &Node) -> &mut Self {
        self.node_as(&node.name, node)
    }

    /// Like [`Envelope::node`] under another element name.
    pub fn node_as(&mut self, tag: &str, node: &Node) -> &mut Self {
        let _ = write!(self.buf, "<{tag}");
        if let Some(ty) = &node.xsi_type {
            self.buf.push_str(" xsi:type=\"");
            escape_into(&mut self.buf, &xsi_qualified(ty));
            self.buf.push('"');
        }
        if let Some(ty) = &node.mo_type {
            self.buf.push_str(" type=\"");
            escape_into(&mut self.buf, ty);
            self.buf.push('"');
        }
        self.buf.push('>');
        if node.children.is_empty() {
            escape_into(&mut self.buf, &node.text);
        } else {
            for child in &node.children {
                self.node(child);
            }
        }
        let _ = write!(self.buf, "</{tag}>");
        self
    }

    /// Finishes the document.
    pub fn finish(mut self) -> String {
        let _ = write!(
            self.buf,
            "</{}></soapenv:Body></soapenv:Envelope>",
            self.method
        );
        self.buf
    }
}

/// XML Schema built-in types need the `xsd:` prefix when written back.
fn xsi_qualified(ty: &str) -> String {
    const XSD: &[&str] = &[
        "string",
        "boolean",
        "int",
        "long",
        "short",
        "byte",
        "float",
        "double",
        "dateTime",
        "base64Binary",
        "anyURI",
    ];
    if XSD.contains(&ty) {
        format!("xsd:{ty}")
    } else {
        ty.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soap::{Response, read_response};

    #[test]
    fn writer_escapes_and_round_trips_nodes() {
        let mut env = Envelope::new("Login");
        env.moref("_this", "SessionManager", "SessionManager")
            .text("userName", "a<b>&\"c'")
            .typed_text("value", "xsd:string", "v");
        let mut device = Node::new("device");
        device.xsi_type = Some("VirtualDisk".into());
        device.children.push(Node::with_text("key", "2000"));
        let mut net = Node::with_text("network", "network-7");
        net.mo_type = Some("Network".into());
        device.children.push(net);
        env.node(&device);
        let xml = env.finish();
        assert!(xml.contains("<userName>a&lt;b&gt;&amp;&quot;c&apos;</userName>"));
        let Response::Ok(login) = read_response(xml.as_bytes()).unwrap() else {
            panic!("fault")
        };
        assert_eq!(login.child_text("userName"), Some("a<b>&\"c'"));
        assert_eq!(
            login.child("value").unwrap().xsi_type.as_deref(),
            Some("string")
        );
        assert_eq!(login.child("device"), Some(&device));
    }

    #[test]
    fn debug_redacts_login_bodies() {
        let mut env = Envelope::new("Login");
        env.text("userName", "alice").text("password", "s3cret-pw");
        let shown = format!("{env:?}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert!(!shown.contains("alice"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
        let mut other = Envelope::new("FindByInventoryPath");
        other.text("inventoryPath", "DC0/vm");
        assert!(format!("{other:?}").contains("DC0/vm"));
    }
}
