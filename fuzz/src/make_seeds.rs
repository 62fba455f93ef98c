//! Writes the seed corpora under `fuzz/corpus/<target>/`: one or more valid inputs per
//! decoder, so the fuzzers start from the real formats rather than from nothing.
//! Run by `fuzz/run.sh --seeds`; the output is committed.

use std::fs;
use std::io::Write;
use std::path::Path;

use medmesh_crypto::{Identity, Member, NetworkKey, Role, Roster, SignedRoster};
use medmesh_protocol::envelope::MIN_CHUNK_SIZE;
use medmesh_protocol::messages::UpdateChunk;
use medmesh_protocol::{
    Announcement, AnnouncementAnswer, Artifact, ArtifactAnswer, ArtifactRequest, Manifest,
    ProgressRecord, Request, Response, SignedManifest, SignedProgress, StatusAnswer, StatusQuery,
    Unavailable, UpdateAnswer, UpdateEnvelope, UpdateHeader, UpdateRequest, WeightEncoding,
};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let node = Identity::from_seed(&[1; 32]);
    let quickstart = include_str!("../../examples/synthetic-quickstart.toml");
    let manifest = Manifest::from_toml(quickstart).expect("the quickstart manifest parses");

    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        fs::create_dir_all(&dir).expect("corpus directory");
        fs::write(dir.join(name), bytes).expect("seed file");
    };

    // Manifests.
    write(
        "manifest_toml",
        "synthetic-quickstart",
        quickstart.as_bytes(),
    );
    write(
        "manifest_toml",
        "brain-extraction",
        include_bytes!("../../examples/brain-extraction.toml"),
    );
    write(
        "manifest_json",
        "robust-median",
        include_bytes!("../../examples/robust-median.json"),
    );
    let json = serde_json::to_string_pretty(&manifest).expect("manifest to JSON");
    write("manifest_json", "synthetic-quickstart", json.as_bytes());

    // Roster and key files.
    let mut roster = Roster::genesis("demo", vec![node.public_key()], 1);
    roster.upsert_member(Member {
        public_key: Identity::from_seed(&[2; 32]).public_key(),
        role: Role::Node,
        site: "site-1".into(),
    });
    roster.upsert_member(Member {
        public_key: Identity::from_seed(&[3; 32]).public_key(),
        role: Role::Researcher,
        site: "lab".into(),
    });
    let mut signed_roster = SignedRoster::unsigned(roster.clone());
    signed_roster.endorse(&node);
    let roster_toml = toml::to_string(&signed_roster).expect("roster to TOML");
    write("roster", "genesis", roster_toml.as_bytes());
    roster.revoke(
        Identity::from_seed(&[2; 32]).public_key(),
        "left the consortium",
    );
    let mut revoked = SignedRoster::unsigned(roster);
    revoked.endorse(&node);
    write(
        "roster",
        "revocation",
        toml::to_string(&revoked).expect("TOML").as_bytes(),
    );
    write("key_files", "identity", node.to_key_file().as_bytes());
    write(
        "key_files",
        "swarm-key",
        NetworkKey::from_bytes([0x5a; 32]).to_key_file().as_bytes(),
    );

    // Messages, one per kind that carries structure.
    let header = UpdateHeader {
        experiment_id: manifest.id.clone(),
        manifest_digest: manifest.digest(),
        round: 4,
        attempt: 0,
        sender: node.public_key(),
        layout_digest: [3; 32],
        num_params: 8,
        encoding: WeightEncoding::F32,
        sample_weight: 12.0,
        payload_len: 0,
        payload_hash: [0; 32],
        chunk_size: MIN_CHUNK_SIZE,
    };
    let envelope = UpdateEnvelope::seal(header, &[0u8; 32], &node);
    let record = ProgressRecord {
        experiment_id: manifest.id.clone(),
        manifest_digest: manifest.digest(),
        round: 4,
        node: node.public_key(),
        loss: 0.3,
        metric: 0.7,
        personalized_metric: None,
        contribution_weight: 12.0,
        peers_averaged: 2,
        finished: false,
        stop_after: None,
        privacy_epsilon: None,        device: "cpu".into(),        bytes_sent: 1 << 20,        bytes_received: 1 << 20,        averaging_shift: Some(0.002),        failure: None,
        unix_ms: 1_800_000_000_000,
    };
    let requests = [
        Request::Announce(Announcement::Manifest(Box::new(SignedManifest::sign(
            manifest.clone(),
            &node,
        )))),
        Request::Announce(Announcement::Roster(signed_roster)),
        Request::Announce(Announcement::Progress(Box::new(SignedProgress::sign(
            record.clone(),
            &node,
        )))),
        Request::Update(UpdateRequest::Offer {
            experiment_id: manifest.id.clone(),
            round: Some(4),
            attempt: 0,
        }),
        Request::Update(UpdateRequest::Chunk {
            experiment_id: manifest.id.clone(),
            round: 4,
            attempt: 0,
            offset: 4096,
        }),
        Request::Update(UpdateRequest::Exchange {
            experiment_id: manifest.id.clone(),
            round: 4,
        }),
        Request::Status(StatusQuery {
            experiment_id: None,
        }),
        Request::Artifact(ArtifactRequest {
            experiment_id: manifest.id.clone(),
            artifact: Artifact::Model,
            offset: 0,
        }),
    ];
    let responses = [
        Response::Announce(AnnouncementAnswer::Manifest {
            experiment_id: manifest.id.clone(),
            manifest_digest: manifest.digest(),
            rejection: None,
        }),
        Response::Update(UpdateAnswer::Offer(envelope.clone())),
        Response::Update(UpdateAnswer::Chunk(UpdateChunk {
            experiment_id: manifest.id.clone(),
            round: 4,
            offset: 0,
            bytes: vec![0x3f; 256],
        })),
        Response::Update(UpdateAnswer::Unavailable {
            experiment_id: manifest.id.clone(),
            reason: Unavailable::NotYetTrained,
            latest_round: Some(3),
        }),
        Response::Update(UpdateAnswer::Exchange {
            round: 4,
            state: medmesh_protocol::ExchangeState::Fetched,
        }),
        Response::Status(StatusAnswer {
            node: node.public_key(),
            records: vec![SignedProgress::sign(record, &node)],
        }),
        Response::Artifact(ArtifactAnswer::Chunk {
            total_len: 300,
            offset: 0,
            bytes: vec![1; 64],
        }),
        Response::Refused {
            reason: "not a member".into(),
        },
        Response::Busy {
            retry_after_ms: 250,
        },
    ];
    for (i, request) in requests.iter().enumerate() {
        write(
            "message",
            &format!("request-{i:02}"),
            &request.encode().expect("encodes"),
        );
    }
    for (i, response) in responses.iter().enumerate() {
        write(
            "message",
            &format!("response-{i:02}"),
            &response.encode().expect("encodes"),
        );
    }
    for (i, encoding) in [
        WeightEncoding::F32,
        WeightEncoding::F16,
        WeightEncoding::Int8,
        WeightEncoding::Masked,
    ]
    .into_iter()
    .enumerate()
    {
        let mut seed = vec![i as u8];
        seed.extend(
            bincode::serde::encode_to_vec(&envelope, bincode::config::standard())
                .expect("envelope encodes"),
        );
        write("envelope", &format!("{encoding:?}"), &seed);
    }

    // Images: a 6x5x2 NIfTI volume, plain and gzipped, and 8- and 16-bit PNGs.
    let dir = std::env::temp_dir().join(format!("medmesh-seeds-{}", std::process::id()));
    let volume = medmesh_imaging::Volume {
        dims: [6, 5, 2],
        spacing: [1.0; 3],
        channels: 1,
        data: (0..60).map(|i| i as f32 * 0.25).collect(),
    };
    let case = medmesh_imaging::Case {
        name: "seed".into(),
        label: medmesh_imaging::LabelVolume {
            dims: volume.dims,
            data: (0..60).map(|i| u8::from(i % 4 == 0)).collect(),
        },
        image: volume,
    };
    medmesh_imaging::msd::write_dataset(&dir, "seed", "fuzz seed", &["bg", "fg"], &[case])
        .expect("seed dataset");
    for (sub, name) in [("imagesTr", "image"), ("labelsTr", "label")] {
        let gz = fs::read(dir.join(sub).join("seed.nii.gz")).expect("seed volume");
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut plain)
            .expect("gunzip seed");
        write("nifti", &format!("{name}.nii.gz"), &gz);
        write("nifti", &format!("{name}.nii"), &plain);
    }
    fs::remove_dir_all(&dir).expect("remove temporary dataset");
    for (depth, name, data) in [
        (
            png::BitDepth::Eight,
            "gray8.png",
            (0..48).collect::<Vec<u8>>(),
        ),
        (png::BitDepth::Sixteen, "gray16.png", (0..96).collect()),
    ] {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, 8, 6);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(depth);
        let mut writer = encoder.write_header().expect("PNG header");
        writer.write_image_data(&data).expect("PNG data");
        writer.finish().expect("PNG end");
        write("png", name, &bytes);
    }
    std::io::stdout()
        .write_all(format!("seed corpora written under {}\n", root.display()).as_bytes())
        .expect("stdout");
}
