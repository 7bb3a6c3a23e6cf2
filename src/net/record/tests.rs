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

/// A server and a client configuration for `suite` and `version` that trust each other,
/// both able to give out their secrets.
fn configs(
    suite: SupportedCipherSuite,
    version: &'static tokio_rustls::rustls::SupportedProtocolVersion,
) -> (ServerConfig, ClientConfig) {
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
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;
    (server, client)
}

async fn pair_with(
    suite: SupportedCipherSuite,
    version: &'static tokio_rustls::rustls::SupportedProtocolVersion,
) -> (ClientTlsStream<TcpStream>, ClientStream) {
    let (server, client) = configs(suite, version);
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

/// A conversation through rustls, then through the record layer taken from it, then
/// through a second record layer built from the first one's handed-over state, and the
/// client's close_notify at the end.
async fn goes_on_talking(
    suite: SupportedCipherSuite,
    version: &'static tokio_rustls::rustls::SupportedProtocolVersion,
) {
    let (mut client, mut server) = pair_with(suite, version).await;
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
    for round in 0..50 {
        send(&mut client, &mut server, b"x", 1).await;
        send(&mut server, &mut client, &pattern(round * 7 + 1, 6), 1_000).await;
    }

    // Handed over once more: the same keys from the same sequence numbers, on a copy
    // of the socket; the first record stream is dropped without writing anything.
    let (socket, state) = server.handover().unwrap();
    let mut encoded = Vec::new();
    state.unwrap().encode(&mut encoded);
    let (state, rest) = RecordState::decode(&encoded).unwrap();
    assert!(rest.is_empty());
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

/// The client role, as pgrelay holds a server connection: a rustls client over a
/// `TlsTransport` taken apart at once (in TLS 1.3 the server's session tickets then come
/// to the record layer, which passes them over), talking to a rustls server both ways,
/// handed over once more, and closed with a last message written without waiting.
async fn goes_on_as_a_client(
    suite: SupportedCipherSuite,
    version: &'static tokio_rustls::rustls::SupportedProtocolVersion,
) {
    use crate::upstream::ServerStream;
    let (server_config, client_config) = configs(suite, version);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connector = TlsConnector::from(Arc::new(client_config));
    let (ours, mut peer) = tokio::join!(
        async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let tls = connector
                .connect("localhost".try_into().unwrap(), crate::net::TlsTransport::new(tcp))
                .await
                .unwrap();
            ServerStream::Tls(Box::new(tls))
        },
        async {
            let (tcp, _) = listener.accept().await.unwrap();
            TlsAcceptor::from(Arc::new(server_config)).accept(tcp).await.unwrap()
        }
    );
    let mut ours = ours;
    assert!(ours.can_move(), "{suite:?}");
    ours.leave_rustls().unwrap();
    assert!(matches!(ours, ServerStream::Resumed(_)));
    send(&mut ours, &mut peer, b"startup", 100).await;
    send(&mut peer, &mut ours, &pattern(200_000, 1), 30_000).await;
    send(&mut ours, &mut peer, &pattern(100_000, 2), 16_384).await;
    assert!(ours.probe_alive(), "idle and open");

    let (socket, state) = ours.handover().unwrap();
    let mut encoded = Vec::new();
    state.unwrap().encode(&mut encoded);
    let (state, _) = RecordState::decode(&encoded).unwrap();
    let copy = std::net::TcpStream::from(socket.try_clone_to_owned().unwrap());
    copy.set_nonblocking(true).unwrap();
    drop(ours);
    let mut ours = ServerStream::Resumed(Box::new(
        RecordStream::new(TcpStream::from_std(copy).unwrap(), state).unwrap(),
    ));
    send(&mut peer, &mut ours, &pattern(50_000, 3), 50_000).await;
    send(&mut ours, &mut peer, &pattern(50_000, 4), 7_000).await;

    // A last message without waiting (a Terminate) and a close_notify: the peer reads a
    // clean end (rustls reports an EOF without close_notify as an error). Then the peer's
    // close_notify: no longer alive.
    ours.try_write_now(b"X\0\0\0\x04");
    ours.close_nowait();
    let mut last = Vec::new();
    peer.read_to_end(&mut last).await.unwrap();
    assert_eq!(last, b"X\0\0\0\x04");
    peer.shutdown().await.unwrap();
    let mut rest = Vec::new();
    assert_eq!(ours.read_to_end(&mut rest).await.unwrap(), 0);
    assert!(!ours.probe_alive());
}

#[tokio::test]
async fn a_server_connection_taken_from_rustls_goes_on_talking() {
    for suite in [
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ] {
        goes_on_as_a_client(suite, &version::TLS13).await;
    }
    for suite in TLS12_SUITES {
        goes_on_as_a_client(suite, &version::TLS12).await;
    }
}

#[test]
fn only_whole_session_tickets_are_passed_over() {
    let ticket = |length: u8| [&[NEW_SESSION_TICKET, 0, 0, length][..], &vec![9; usize::from(length)]].concat();
    assert!(only_session_tickets(&ticket(3)));
    assert!(only_session_tickets(&[ticket(3), ticket(0), ticket(200)].concat()));
    assert!(!only_session_tickets(&[]));
    assert!(!only_session_tickets(&ticket(3)[..5]), "a ticket cut short");
    assert!(!only_session_tickets(
        &[ticket(3), vec![KEY_UPDATE, 0, 0, 1, 0]].concat()
    ));
}

/// The TLS 1.2 AEAD suites rustls offers with ring, with an ECDSA certificate (the record
/// layer is the same for the RSA ones).
const TLS12_SUITES: [SupportedCipherSuite; 3] = [
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
];

#[tokio::test]
async fn a_rustls_client_goes_on_talking_to_the_record_layer() {
    for suite in [
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ] {
        goes_on_talking(suite, &version::TLS13).await;
    }
}

#[tokio::test]
async fn a_tls_1_2_rustls_client_goes_on_talking_to_the_record_layer() {
    for suite in TLS12_SUITES {
        goes_on_talking(suite, &version::TLS12).await;
    }
}

/// A TLS 1.2 pair whose server side is a record stream, and a sealer of records as the
/// client would seal them (its write keys are the server's read keys), for what a rustls
/// client never sends.
async fn tls12_resumed(suite: SupportedCipherSuite) -> (ClientTlsStream<TcpStream>, ClientStream, Direction) {
    let (mut client, mut server) = pair_with(suite, &version::TLS12).await;
    send(&mut client, &mut server, b"startup", 100).await;
    server.leave_rustls().unwrap();
    let (_, state) = server.handover().unwrap();
    let state = state.unwrap();
    assert_eq!(state.version, Version::Tls12);
    let sealer = Direction::new(state.version, state.suite, state.rx.clone(), true).unwrap();
    (client, server, sealer)
}

/// Seals one record as the client and writes it to the socket directly.
async fn write_raw(client: &mut ClientTlsStream<TcpStream>, sealer: &mut Direction, content_type: u8, content: &[u8]) {
    let mut record = BytesMut::new();
    sealer.seal(content_type, content, &mut record).unwrap();
    client.get_mut().0.write_all(&record).await.unwrap();
}

#[tokio::test]
async fn tls_1_2_records_sealed_here_follow_those_rustls_sealed() {
    for suite in TLS12_SUITES {
        let (mut client, mut server, mut sealer) = tls12_resumed(suite).await;
        // Records of the client's own, then ones sealed here in its place: the sequence
        // numbers and nonces go on, and an empty fragment is allowed.
        send(&mut client, &mut server, b"from rustls", 3).await;
        sealer.secrets.seq += 4;
        write_raw(&mut client, &mut sealer, APPLICATION_DATA, b"sealed here").await;
        write_raw(&mut client, &mut sealer, APPLICATION_DATA, b"").await;
        write_raw(&mut client, &mut sealer, APPLICATION_DATA, b"!").await;
        let mut buffer = [0u8; 12];
        server.read_exact(&mut buffer).await.unwrap();
        assert_eq!(&buffer, b"sealed here!", "{suite:?}");
    }
}

#[tokio::test]
async fn a_tls_1_2_renegotiation_or_alert_ends_the_connection_with_an_error() {
    for suite in TLS12_SUITES {
        let mut buffer = [0u8; 16];
        // A ClientHello on the established connection.
        let (mut client, mut server, mut sealer) = tls12_resumed(suite).await;
        write_raw(&mut client, &mut sealer, HANDSHAKE, &[1, 0, 0, 4, 3, 3, 0, 0]).await;
        let error = server.read(&mut buffer).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("renegotiation"), "{error}");
        assert!(server.read(&mut buffer).await.is_err(), "and it stays failed");

        // A ChangeCipherSpec.
        let (mut client, mut server, mut sealer) = tls12_resumed(suite).await;
        write_raw(&mut client, &mut sealer, CHANGE_CIPHER_SPEC, &[1]).await;
        let error = server.read(&mut buffer).await.unwrap_err();
        assert!(error.to_string().contains("type 20"), "{error}");

        // An alert other than close_notify (no_renegotiation, a warning).
        let (mut client, mut server, mut sealer) = tls12_resumed(suite).await;
        write_raw(&mut client, &mut sealer, ALERT, &[1, 100]).await;
        let error = server.read(&mut buffer).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted, "{error}");

        // A close_notify sealed here is the end of the stream too.
        let (mut client, mut server, mut sealer) = tls12_resumed(suite).await;
        write_raw(&mut client, &mut sealer, ALERT, &[1, CLOSE_NOTIFY]).await;
        assert_eq!(server.read(&mut buffer).await.unwrap(), 0);
    }
}

#[test]
fn a_tls_1_3_state_keeps_its_layout_and_a_tls_1_2_one_says_its_version() {
    let side = |fill: u8| Secrets {
        key: vec![fill; 16],
        iv: [fill; NONCE_LEN],
        seq: u64::from(fill) << 33,
    };
    for version in [Version::Tls13, Version::Tls12] {
        let state = RecordState {
            version,
            suite: Suite::Aes128Gcm,
            tx: side(1),
            rx: side(2),
        };
        let mut encoded = Vec::new();
        state.encode(&mut encoded);
        // TLS 1.3: the suite alone, as before versions were recorded.
        let first = if version == Version::Tls13 { 1 } else { 0x11 };
        assert_eq!(encoded[0], first);
        assert_eq!(RecordState::decode(&encoded), Some((state, &[][..])));
    }
    assert_eq!(RecordState::decode(&[0x21]), None, "an unknown version");
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
    let suites = [
        (cipher_suite::TLS13_AES_128_GCM_SHA256, &version::TLS13),
        (cipher_suite::TLS13_CHACHA20_POLY1305_SHA256, &version::TLS13),
    ]
    .into_iter()
    .chain(TLS12_SUITES.map(|suite| (suite, &version::TLS12)));
    for (suite, version) in suites {
        // The last byte (the tag), a byte of the ciphertext, or (TLS 1.2 AES-GCM) one of
        // the explicit nonce.
        for from_end in [1, 20, 25] {
            let (mut client, mut server) = pair_with(suite, version).await;
            send(&mut client, &mut server, b"startup", 100).await;
            server.leave_rustls().unwrap();
            // A record sealed by the client, one bit changed, written to the socket directly.
            let mut record = Vec::new();
            std::io::Write::write_all(&mut client.get_mut().1.writer(), b"a query of some length").unwrap();
            client.get_mut().1.write_tls(&mut record).unwrap();
            let at = record.len() - from_end;
            record[at] ^= 1;
            client.get_mut().0.write_all(&record).await.unwrap();
            let mut buffer = [0u8; 16];
            let error = server.read(&mut buffer).await.unwrap_err();
            assert!(
                error.to_string().contains("authentication"),
                "{suite:?} {from_end}: {error}"
            );
        }
    }
}

#[test]
fn a_sequence_number_at_the_limit_seals_nothing() {
    for version in [Version::Tls13, Version::Tls12] {
        let mut direction = Direction::new(
            version,
            Suite::Aes128Gcm,
            Secrets {
                key: vec![9; 16],
                iv: [0; NONCE_LEN],
                seq: (1 << 24) - 1,
            },
            true,
        )
        .unwrap();
        let mut out = BytesMut::new();
        assert!(direction.seal(APPLICATION_DATA, b"last", &mut out).is_ok());
        let sealed = out.len();
        assert!(direction.seal(APPLICATION_DATA, b"one more", &mut out).is_err());
        assert_eq!(out.len(), sealed, "nothing more is sealed");
        assert_eq!(direction.secrets.seq, 1 << 24, "no number is used twice");
    }
}

#[tokio::test]
async fn a_stream_past_half_its_records_says_so() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let state = |suite, key_len, seq| RecordState {
        version: Version::Tls13,
        suite,
        tx: Secrets {
            key: vec![1; key_len],
            iv: [0; NONCE_LEN],
            seq,
        },
        rx: Secrets {
            key: vec![2; key_len],
            iv: [0; NONCE_LEN],
            seq: 0,
        },
    };
    let fresh = RecordStream::new(tcp, state(Suite::Aes128Gcm, 16, (1 << 23) - 1)).unwrap();
    assert!(!fresh.half_spent());
    let tcp = fresh.tcp;
    let spent = RecordStream::new(tcp, state(Suite::Aes256Gcm, 32, 1 << 23)).unwrap();
    assert!(spent.half_spent());
    let tcp = spent.tcp;
    let chacha = RecordStream::new(tcp, state(Suite::Chacha20Poly1305, 32, 1 << 40)).unwrap();
    assert!(!chacha.half_spent(), "bounded by the sequence number alone");
}
