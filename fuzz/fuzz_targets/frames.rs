//! Fuzzes the decoding of every frame a peer can send on the cluster port and on a stage port
//! (`sollol-shared`'s protocol and layer types, postcard-encoded): any input decodes or is an error,
//! never a panic or an allocation sized by a length field alone; what decodes encodes back to the
//! same message.
#![no_main]

use serde::Serialize;
use serde::de::DeserializeOwned;
use sollol_shared::layers::{
    LayerAuth, LayerChallenge, LayerHello, LayerWelcome, StageReply, StageRequest,
};
use sollol_shared::protocol::{
    AgentMessage, Auth, AuthReply, CoordinatorMessage, Hello, HelloPrefix, HelloReply,
};

fn round_trip<T: Serialize + DeserializeOwned + std::fmt::Debug>(data: &[u8]) {
    if let Ok(message) = postcard::from_bytes::<T>(data) {
        let encoded = postcard::to_stdvec(&message).expect("a decoded message encodes");
        let again: T = postcard::from_bytes(&encoded).expect("its encoding decodes");
        assert_eq!(format!("{message:?}"), format!("{again:?}"));
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    round_trip::<HelloPrefix>(data);
    round_trip::<Hello>(data);
    round_trip::<HelloReply>(data);
    round_trip::<Auth>(data);
    round_trip::<AuthReply>(data);
    round_trip::<AgentMessage>(data);
    round_trip::<CoordinatorMessage>(data);
    round_trip::<LayerHello>(data);
    round_trip::<LayerChallenge>(data);
    round_trip::<LayerAuth>(data);
    round_trip::<LayerWelcome>(data);
    round_trip::<StageRequest>(data);
    round_trip::<StageReply>(data);
});
