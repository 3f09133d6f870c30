//! The examples of docs/PROTOCOL.md, checked against the codec so the document cannot drift
//! from the code.
//!
//! Every fenced block right after a marker line `<!-- example: binary KIND -->` or
//! `<!-- example: text KIND -->` is one example. A binary block is hex: whitespace-separated
//! byte pairs, with `#` starting a comment that runs to the end of the line. In a text block,
//! each line (the last one included) is followed by one LF. For each example this test checks:
//! - it decodes, to a frame of the kind its marker names;
//! - encoding that frame again gives exactly the example's bytes;
//! - every frame kind has exactly one binary and one text example;
//! - the binary and the text example of a kind decode to the same frame.

use std::collections::BTreeMap;

use bytes::Bytes;
use mbws::mbws::{decode, encode, Binding, CodecLimits, Frame, FrameKind};

const DOCUMENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md");
const MARKER_START: &str = "<!-- example:";
const MARKER_END: &str = "-->";

struct Example {
    binding: Binding,
    kind: FrameKind,
    /// 1-based line of the marker in the document, for failure messages.
    line: usize,
    payload: Vec<u8>,
}

fn examples() -> Vec<Example> {
    let document = std::fs::read_to_string(DOCUMENT).unwrap_or_else(|error| panic!("cannot read {DOCUMENT}: {error}"));
    let lines: Vec<&str> = document.lines().collect();
    let mut examples = Vec::new();
    let mut index = 0;
    while index < lines.len() {
        let line = lines[index].trim();
        index += 1;
        let Some(marker) = line.strip_prefix(MARKER_START) else {
            continue;
        };
        let at = index; // 1-based line number of the marker
        let marker = marker
            .strip_suffix(MARKER_END)
            .unwrap_or_else(|| panic!("line {at}: marker does not end with `{MARKER_END}`: {line}"));
        let words: Vec<&str> = marker.split_whitespace().collect();
        let [binding, kind] = words[..] else {
            panic!("line {at}: marker must be `{MARKER_START} binary|text KIND {MARKER_END}`: {line}");
        };
        let binding = match binding {
            "binary" => Binding::Binary,
            "text" => Binding::Text,
            other => panic!("line {at}: binding must be `binary` or `text`, not `{other}`"),
        };
        let kind = FrameKind::from_name(kind.as_bytes())
            .unwrap_or_else(|| panic!("line {at}: `{kind}` is not a frame kind name"));
        let fence = lines.get(index).map(|line| line.trim_end()).unwrap_or_default();
        assert!(fence.starts_with("```"), "line {at}: the marker must be followed directly by a ``` block");
        index += 1;
        let mut block = Vec::new();
        loop {
            let line = *lines.get(index).unwrap_or_else(|| panic!("line {at}: the example block is not closed"));
            index += 1;
            if line.trim_end() == "```" {
                break;
            }
            block.push(line);
        }
        let payload = match binding {
            Binding::Binary => parse_hex(&block, at),
            Binding::Text => block.iter().flat_map(|line| line.bytes().chain([b'\n'])).collect(),
        };
        examples.push(Example { binding, kind, line: at, payload });
    }
    examples
}

fn parse_hex(block: &[&str], marker_line: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (offset, line) in block.iter().enumerate() {
        let data = line.split('#').next().unwrap_or_default();
        for pair in data.split_whitespace() {
            let valid = pair.len() == 2 && pair.bytes().all(|byte| byte.is_ascii_hexdigit());
            assert!(valid, "line {}: `{pair}` is not a hex byte pair", marker_line + 2 + offset);
            bytes.push(u8::from_str_radix(pair, 16).expect("checked hex"));
        }
    }
    bytes
}

fn decode_example(example: &Example) -> Frame {
    let result = decode(example.binding, Bytes::from(example.payload.clone()), &CodecLimits::default());
    result.unwrap_or_else(|error| {
        panic!("line {}: {:?} {} example does not decode: {error}", example.line, example.binding, example.kind.name())
    })
}

#[test]
fn every_example_decodes_and_re_encodes_to_the_same_bytes() {
    let examples = examples();
    assert!(!examples.is_empty(), "{DOCUMENT} has no examples");
    for example in &examples {
        let frame = decode_example(example);
        assert_eq!(
            frame.kind(),
            example.kind,
            "line {}: the example decodes to a {} frame",
            example.line,
            frame.kind().name()
        );
        let encoded = encode(example.binding, &frame);
        assert!(
            encoded[..] == example.payload[..],
            "line {}: re-encoding the {:?} {} example gives different bytes:\n  document: {:02x?}\n  encoder:  {:02x?}",
            example.line,
            example.binding,
            example.kind.name(),
            example.payload,
            &encoded[..]
        );
    }
}

#[test]
fn every_kind_has_one_binary_and_one_text_example_that_agree() {
    let mut by_kind: BTreeMap<(u8, bool), (usize, Frame)> = BTreeMap::new();
    for example in examples() {
        let key = (example.kind.code(), example.binding == Binding::Text);
        let frame = decode_example(&example);
        if let Some((first_line, _)) = by_kind.insert(key, (example.line, frame)) {
            panic!(
                "line {}: a second {:?} example of {} (the first is at line {first_line})",
                example.line,
                example.binding,
                example.kind.name()
            );
        }
    }
    for kind in FrameKind::ALL {
        let binary = by_kind.get(&(kind.code(), false));
        let text = by_kind.get(&(kind.code(), true));
        let (Some((binary_line, binary)), Some((text_line, text))) = (binary, text) else {
            panic!("{DOCUMENT}: {} needs both a binary and a text example", kind.name());
        };
        assert_eq!(
            binary,
            text,
            "{}: the binary example (line {binary_line}) and the text example (line {text_line}) differ",
            kind.name()
        );
    }
}
