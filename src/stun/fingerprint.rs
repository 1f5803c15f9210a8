//! FINGERPRINT attribute (RFC 8489 section 14.7): CRC-32 (ISO HDLC, as in
//! Ethernet and zlib) of the message up to the attribute, XOR 0x5354554e.

/// XORed into the CRC so a STUN FINGERPRINT never matches the CRC another
/// protocol multiplexed on the same port might carry.
pub const FINGERPRINT_XOR: u32 = 0x5354_554e;

const POLY_REFLECTED: u32 = 0xedb8_8320;

const CRC_TABLE: [u32; 256] = build_table();

const fn build_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 != 0 {
                POLY_REFLECTED ^ (c >> 1)
            } else {
                c >> 1
            };
            bit += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc = CRC_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

pub fn fingerprint(bytes: &[u8]) -> u32 {
    crc32(bytes) ^ FINGERPRINT_XOR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        // The standard check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }
}
