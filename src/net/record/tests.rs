//! The record layer against rustls itself: a rustls client on one end of a loopback
//! connection, a rustls server on the other that is taken apart mid-conversation, and the
//! conversation going on through `RecordStream`.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream as ClientTlsStream;
use tokio_rustls::rustls::crypto::ring::{cipher_suite, default_provider};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedCipherSuite, version};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::net::ClientStream;

/// A connected pair: the rustls client, and the server side as pgrelay holds it.
async fn pair(suite: SupportedCipherSuite) -> (ClientTlsStream<TcpStream>, ClientStream) {
    pair_with(suite, &version::TLS13).await
}

async fn pair_with(
    suite: SupportedCipherSuite,
    version: &'static tokio_rustls::rustls::SupportedProtocolVersion,
) -> (ClientTlsStream<TcpStream>, ClientStream) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let mut provider = default_provider();
    provider.cipher_suites = vec![suite];
    let provider = Arc::new(provider);
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    server.enable_secret_extraction = true;
    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connector = TlsConnector::from(Arc::new(client));
    let (client, accepted) = tokio::join!(
        async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap()
        },
        async {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut stream = ClientStream::Tcp(tcp);
            stream.start_tls(&TlsAcceptor::from(Arc::new(server))).await.unwrap();
            stream
        }
    );
    (client, accepted)
}

fn pattern(length: usize, seed: u8) -> Vec<u8> {
    (0..length).map(|at| (at % 251) as u8 ^ seed).collect()
}

/// `data` written by one side in pieces of `piece` bytes, read whole by the other.
async fn send<W, R>(writer: &mut W, reader: &mut R, data: &[u8], piece: usize)
where
    W: tokio::io::AsyncWrite + Unpin,
    R: tokio::io::AsyncRead + Unpin,
{
    let mut received = vec![0; data.len()];
    let (written, read) = tokio::join!(
        async {
            for chunk in data.chunks(piece) {
                writer.write_all(chunk).await?;
            }
            writer.flush().await
        },
        reader.read_exact(&mut received)
    );
    written.unwrap();
    read.unwrap();
    assert!(received == data, "the data arrived changed");
}

#[tokio::test]
async fn a_rustls_client_goes_on_talking_to_the_record_layer() {
    for suite in [
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ] {
        let (mut client, mut server) = pair(suite).await;
        // Some of the conversation through rustls on both ends.
        send(&mut client, &mut server, b"startup", 100).await;
        send(&mut server, &mut client, &pattern(40_000, 1), 7_000).await;
        assert!(server.can_move(), "{suite:?}");

        server.leave_rustls().unwrap();
        assert!(matches!(server, ClientStream::Resumed(_)));
        assert!(server.can_move());
        // Many records each way, small and full-sized, and writes that span records.
        send(&mut client, &mut server, &pattern(100_000, 2), 30_000).await;
        send(&mut server, &mut client, &pattern(300_000, 3), 70_000).await;
        send(&mut client, &mut server, b"x", 1).await;
        send(&mut server, &mut client, b"y", 1).await;

        // Handed over once more: the same keys from the same sequence numbers, on a copy
        // of the socket; the first record stream is dropped without writing anything.
        let (socket, state) = server.handover().unwrap();
        let state = state.unwrap();
        assert_eq!(state.suite, Suite::from_code(state.suite.code()).unwrap());
        let copy = std::net::TcpStream::from(socket.try_clone_to_owned().unwrap());
        copy.set_nonblocking(true).unwrap();
        drop(server);
        let mut server = ClientStream::Resumed(Box::new(
            RecordStream::new(TcpStream::from_std(copy).unwrap(), state).unwrap(),
        ));
        send(&mut client, &mut server, &pattern(50_000, 4), 50_000).await;
        send(&mut server, &mut client, &pattern(50_000, 5), 16_384).await;

        // The client's close_notify is the end of the stream.
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0);
        assert!(!server.can_move(), "a closed stream does not move");
    }
}

#[tokio::test]
async fn a_tls_1_2_connection_is_left_to_rustls() {
    let (mut client, mut server) =
        pair_with(cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, &version::TLS12).await;
    send(&mut client, &mut server, b"startup", 100).await;
    assert!(!server.can_move());
    assert!(server.leave_rustls().is_err());
    assert!(matches!(server, ClientStream::Tls(_)), "left as it was");
    send(&mut server, &mut client, b"still rustls", 100).await;
}

#[tokio::test]
async fn a_key_update_ends_the_connection_with_an_error() {
    let (mut client, mut server) = pair(cipher_suite::TLS13_AES_128_GCM_SHA256).await;
    send(&mut client, &mut server, b"startup", 100).await;
    server.leave_rustls().unwrap();
    send(&mut client, &mut server, b"before", 100).await;
    client.get_mut().1.refresh_traffic_keys().unwrap();
    client.write_all(b"after").await.unwrap();
    client.flush().await.unwrap();
    let mut buffer = [0u8; 16];
    let error = server.read(&mut buffer).await.unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    assert!(error.to_string().contains("KeyUpdate"), "{error}");
    // And it stays failed.
    assert!(server.read(&mut buffer).await.is_err());
}

#[tokio::test]
async fn a_record_altered_on_the_way_is_refused() {
    let (mut client, mut server) = pair(cipher_suite::TLS13_AES_128_GCM_SHA256).await;
    send(&mut client, &mut server, b"startup", 100).await;
    server.leave_rustls().unwrap();
    // A record sealed by the client, one bit changed, written to the socket directly.
    let mut record = Vec::new();
    std::io::Write::write_all(&mut client.get_mut().1.writer(), b"query").unwrap();
    client.get_mut().1.write_tls(&mut record).unwrap();
    let last = record.len() - 1;
    record[last] ^= 1;
    client.get_mut().0.write_all(&record).await.unwrap();
    let mut buffer = [0u8; 16];
    let error = server.read(&mut buffer).await.unwrap_err();
    assert!(error.to_string().contains("authentication"), "{error}");
}

#[test]
fn a_sequence_number_at_the_limit_seals_nothing() {
    let mut direction = Direction::new(
        Suite::Aes128Gcm,
        Secrets {
            key: vec![9; 16],
            iv: [0; NONCE_LEN],
            seq: (1 << 24) - 1,
        },
    )
    .unwrap();
    assert!(direction.next_nonce().is_ok());
    assert!(direction.next_nonce().is_err());
    assert_eq!(direction.secrets.seq, 1 << 24, "no number is used twice");
}
