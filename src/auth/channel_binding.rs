//! `tls-server-end-point` channel binding data (RFC 5929 §4.1): the hash of the certificate
//! pgrelay presents to its TLS clients, which SCRAM-SHA-256-PLUS binds each login to.
//!
//! The hash function follows the certificate's signature algorithm: SHA-256 when that uses
//! MD5 or SHA-1, else the algorithm's own hash. Algorithms with no single hash (Ed25519,
//! RSASSA-PSS, whose hash sits in parameters OpenSSL does not look at either) have no
//! binding defined; PostgreSQL refuses to bind with them, and pgrelay then does not offer
//! SCRAM-SHA-256-PLUS at all.

use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
use thiserror::Error;

/// The only channel binding type PostgreSQL (and so every libpq client) uses.
pub const TLS_SERVER_END_POINT: &str = "tls-server-end-point";

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ChannelBindingError {
    #[error("the certificate is not valid DER: {0}")]
    BadCertificate(&'static str),
    #[error("the certificate's signature algorithm has no single hash function to bind with")]
    UnsupportedAlgorithm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HashFn {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// Signature algorithm OIDs (DER content bytes) and the hash RFC 5929 binds with.
const ALGORITHMS: &[(&[u8], HashFn)] = &[
    // md5WithRSAEncryption, sha1WithRSAEncryption: upgraded to SHA-256.
    (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04], HashFn::Sha256),
    (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05], HashFn::Sha256),
    // sha256/384/512/224WithRSAEncryption.
    (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b], HashFn::Sha256),
    (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], HashFn::Sha384),
    (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], HashFn::Sha512),
    (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0e], HashFn::Sha224),
    // ecdsa-with-SHA1, then ecdsa-with-SHA224/256/384/512.
    (&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01], HashFn::Sha256),
    (&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x01], HashFn::Sha224),
    (&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02], HashFn::Sha256),
    (&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03], HashFn::Sha384),
    (&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04], HashFn::Sha512),
    // dsa-with-sha1, dsa-with-sha224, dsa-with-sha256.
    (&[0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x03], HashFn::Sha256),
    (&[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03, 0x01], HashFn::Sha224),
    (&[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03, 0x02], HashFn::Sha256),
];

/// The channel binding data for the DER certificate `cert` (the first of the chain pgrelay
/// sends), as a client computes it from the certificate it received.
pub fn tls_server_end_point(cert: &[u8]) -> Result<Vec<u8>, ChannelBindingError> {
    let oid = signature_algorithm(cert)?;
    let hash = ALGORITHMS
        .iter()
        .find(|(known, _)| *known == oid)
        .map(|(_, hash)| *hash)
        .ok_or(ChannelBindingError::UnsupportedAlgorithm)?;
    Ok(match hash {
        HashFn::Sha224 => Sha224::digest(cert).to_vec(),
        HashFn::Sha256 => Sha256::digest(cert).to_vec(),
        HashFn::Sha384 => Sha384::digest(cert).to_vec(),
        HashFn::Sha512 => Sha512::digest(cert).to_vec(),
    })
}

const SEQUENCE: u8 = 0x30;
const OBJECT_IDENTIFIER: u8 = 0x06;

/// The OID of `Certificate.signatureAlgorithm` (RFC 5280 §4.1: SEQUENCE { tbsCertificate,
/// signatureAlgorithm, signatureValue }). Only the outer structure is read; the certificate
/// itself was already accepted by rustls.
fn signature_algorithm(cert: &[u8]) -> Result<&[u8], ChannelBindingError> {
    let (certificate, _) = tlv(cert, SEQUENCE, "expected the Certificate SEQUENCE")?;
    let (_, rest) = tlv(certificate, SEQUENCE, "expected the tbsCertificate SEQUENCE")?;
    let (algorithm, _) = tlv(rest, SEQUENCE, "expected the signatureAlgorithm SEQUENCE")?;
    let (oid, _) = tlv(algorithm, OBJECT_IDENTIFIER, "expected the algorithm OID")?;
    Ok(oid)
}

/// Splits one DER element with tag `tag` off `input`: (its content, what follows it).
fn tlv<'a>(input: &'a [u8], tag: u8, what: &'static str) -> Result<(&'a [u8], &'a [u8]), ChannelBindingError> {
    let bad = ChannelBindingError::BadCertificate(what);
    let (&found, rest) = input.split_first().ok_or(bad.clone())?;
    if found != tag {
        return Err(bad);
    }
    let (&first, rest) = rest.split_first().ok_or(bad.clone())?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form: the low bits say how many length bytes follow (at most 4 here: no
        // certificate is 4 GB).
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return Err(bad);
        }
        let (bytes, rest) = rest.split_at_checked(count).ok_or(bad.clone())?;
        let len = bytes.iter().fold(0usize, |len, &byte| (len << 8) | usize::from(byte));
        (len, rest)
    };
    rest.split_at_checked(len).ok_or(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(algorithm: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(algorithm).unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn hash_follows_the_signature_algorithm() {
        let p256 = certificate(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(tls_server_end_point(&p256).unwrap(), Sha256::digest(&p256).to_vec());
        let p384 = certificate(&rcgen::PKCS_ECDSA_P384_SHA384);
        let bound = tls_server_end_point(&p384).unwrap();
        assert_eq!(bound.len(), 48);
        assert_eq!(bound, Sha384::digest(&p384).to_vec());
        let ed25519 = certificate(&rcgen::PKCS_ED25519);
        assert_eq!(
            tls_server_end_point(&ed25519),
            Err(ChannelBindingError::UnsupportedAlgorithm)
        );
    }

    /// A hand-made skeleton: SHA-1 and MD5 signatures bind with SHA-256 (RFC 5929 §4.1).
    #[test]
    fn weak_hashes_are_upgraded_to_sha256() {
        for oid in [
            &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05][..],
            &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04],
            &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01],
        ] {
            let cert = skeleton(oid);
            assert_eq!(tls_server_end_point(&cert).unwrap(), Sha256::digest(&cert).to_vec());
        }
        let sha512 = skeleton(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d]);
        assert_eq!(tls_server_end_point(&sha512).unwrap(), Sha512::digest(&sha512).to_vec());
    }

    fn skeleton(oid: &[u8]) -> Vec<u8> {
        let mut algorithm = vec![OBJECT_IDENTIFIER, oid.len() as u8];
        algorithm.extend_from_slice(oid);
        algorithm.extend_from_slice(&[0x05, 0x00]);
        // A tbsCertificate long enough to need a long-form length.
        let mut body = vec![SEQUENCE, 0x81, 200];
        body.extend_from_slice(&[0u8; 200]);
        body.push(SEQUENCE);
        body.push(algorithm.len() as u8);
        body.extend_from_slice(&algorithm);
        body.extend_from_slice(&[0x03, 0x01, 0x00]);
        let mut cert = vec![SEQUENCE, 0x82, (body.len() >> 8) as u8, body.len() as u8];
        cert.extend_from_slice(&body);
        cert
    }

    #[test]
    fn malformed_certificates_are_errors() {
        let good = skeleton(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]);
        for len in 0..good.len() {
            assert!(tls_server_end_point(&good[..len]).is_err(), "{len}");
        }
        assert!(tls_server_end_point(&[0x31, 0x00]).is_err());
        assert!(tls_server_end_point(&[0x30, 0x85, 0, 0, 0, 0, 1]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = tls_server_end_point(&bytes);
        }
    }
}
