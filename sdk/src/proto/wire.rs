//! Wire-compatible forms of registry.v1 messages for the hot paths.
//!
//! A `repeated Instance instances = 3` field is, on the wire, each instance's encoding behind
//! the field's key and a length, back to back. So a server can keep every instance encoded
//! once, when it changes, concatenate those entries once per change of the service, and answer
//! every Discover until the next change by copying one contiguous buffer; and a client that
//! only counts or forwards instances can keep them encoded. Clients that want the instances
//! decode [`super::DiscoverResponse`] from the same bytes as usual.

use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};

/// Field number of `DiscoverResponse.instances`.
const INSTANCES_TAG: u32 = 3;

/// The encoding of `instance`, as [`EncodedInstances::push`] takes it.
pub fn encode_instance(instance: &super::Instance) -> Bytes {
    Bytes::from(instance.encode_to_vec())
}

/// `DiscoverResponse.instances` as it is on the wire: for each instance, the field's key, the
/// length and the instance's encoding.
#[derive(Clone, PartialEq, Eq, Default, Debug)]
pub struct EncodedInstances {
    field: Bytes,
    count: usize,
}

impl EncodedInstances {
    /// A builder for about `count` instances of about `size` bytes each.
    pub fn builder(count: usize, size: usize) -> EncodedInstancesBuilder {
        EncodedInstancesBuilder {
            field: BytesMut::with_capacity(count * (size + 3)),
            count: 0,
        }
    }

    /// How many instances.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The encoded field (entries back to back).
    pub fn as_bytes(&self) -> &Bytes {
        &self.field
    }
}

/// Builds [`EncodedInstances`] entry by entry.
#[derive(Debug)]
pub struct EncodedInstancesBuilder {
    field: BytesMut,
    count: usize,
}

impl EncodedInstancesBuilder {
    /// Appends one instance given its encoding.
    pub fn push(&mut self, instance: &[u8]) {
        prost::encoding::encode_key(INSTANCES_TAG, WireType::LengthDelimited, &mut self.field);
        prost::encoding::encode_varint(instance.len() as u64, &mut self.field);
        self.field.put_slice(instance);
        self.count += 1;
    }

    /// The entries so far.
    pub fn finish(self) -> EncodedInstances {
        EncodedInstances {
            field: self.field.freeze(),
            count: self.count,
        }
    }
}

/// [`super::DiscoverResponse`] with its instances kept encoded.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct EncodedDiscoverResponse {
    /// The caller's revision is current: no instances follow.
    pub not_modified: bool,
    /// Revision of the service's instance set.
    pub revision: u64,
    /// The instances, encoded.
    pub instances: EncodedInstances,
}

impl Message for EncodedDiscoverResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if self.not_modified {
            prost::encoding::bool::encode(1, &self.not_modified, buf);
        }
        if self.revision != 0 {
            prost::encoding::uint64::encode(2, &self.revision, buf);
        }
        buf.put_slice(&self.instances.field);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => prost::encoding::bool::merge(wire_type, &mut self.not_modified, buf, ctx),
            2 => prost::encoding::uint64::merge(wire_type, &mut self.revision, buf, ctx),
            INSTANCES_TAG => {
                let mut entry = Bytes::new();
                prost::encoding::bytes::merge(wire_type, &mut entry, buf, ctx)?;
                // Taking the field back as a vector reuses its allocation (it is not shared
                // while decoding), so appending stays amortised O(1).
                let mut field = Vec::from(std::mem::take(&mut self.instances.field));
                prost::encoding::encode_key(INSTANCES_TAG, WireType::LengthDelimited, &mut field);
                prost::encoding::encode_varint(entry.len() as u64, &mut field);
                field.extend_from_slice(&entry);
                self.instances.field = Bytes::from(field);
                self.instances.count += 1;
                Ok(())
            }
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let mut len = self.instances.field.len();
        if self.not_modified {
            len += prost::encoding::bool::encoded_len(1, &self.not_modified);
        }
        if self.revision != 0 {
            len += prost::encoding::uint64::encoded_len(2, &self.revision);
        }
        len
    }

    fn clear(&mut self) {
        *self = EncodedDiscoverResponse::default();
    }
}

/// The server's codec: prost, except that a response is written into a buffer reserved for
/// its whole encoded length. tonic starts each message in an 8 KiB buffer that doubles as it
/// fills; a Discover answer of 100 instances (about 20 KiB) was copied three times over on
/// the way, a third of the server's time in that call.
#[cfg(feature = "server")]
#[derive(Debug, Clone, Copy)]
pub struct ServerCodec<T, U>(std::marker::PhantomData<(T, U)>);

#[cfg(feature = "server")]
impl<T, U> Default for ServerCodec<T, U> {
    fn default() -> Self {
        ServerCodec(std::marker::PhantomData)
    }
}

#[cfg(feature = "server")]
impl<T, U> tonic::codec::Codec for ServerCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ReservingEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ReservingEncoder(std::marker::PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::raw_decoder(tonic::codec::BufferSettings::default())
    }
}

/// [`ServerCodec`]'s encoder.
#[cfg(feature = "server")]
#[derive(Debug, Clone, Copy)]
pub struct ReservingEncoder<T>(std::marker::PhantomData<T>);

#[cfg(feature = "server")]
impl<T: prost::Message> tonic::codec::Encoder for ReservingEncoder<T> {
    type Item = T;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: T,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        buf.reserve(item.encoded_len());
        item.encode_raw(buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{DiscoverResponse, HealthCheck, Instance};

    fn instance(id: &str) -> Instance {
        Instance {
            id: id.into(),
            namespace: "prod".into(),
            service: "orders".into(),
            host: "10.0.0.1".into(),
            port: 8080,
            weight: 100,
            metadata: [("zone".to_owned(), "a".to_owned())].into(),
            health_check: Some(HealthCheck { ttl_ms: 5000 }),
            healthy: true,
            revision: 42,
            ..Default::default()
        }
    }

    #[test]
    fn encoded_and_decoded_forms_are_the_same_bytes() {
        let instances = vec![instance("a"), instance("b"), Instance::default()];
        let decoded = DiscoverResponse {
            not_modified: false,
            revision: 7,
            instances: instances.clone(),
        };
        let mut builder = EncodedInstances::builder(instances.len(), 64);
        for one in &instances {
            builder.push(&encode_instance(one));
        }
        let encoded = EncodedDiscoverResponse {
            not_modified: false,
            revision: 7,
            instances: builder.finish(),
        };
        assert_eq!(encoded.instances.len(), 3);
        assert_eq!(encoded.encoded_len(), decoded.encoded_len());
        assert_eq!(decoded.encode_to_vec(), encoded.encode_to_vec());
        let back = DiscoverResponse::decode(&encoded.encode_to_vec()[..]).unwrap();
        assert_eq!(back, decoded);
        let raw = EncodedDiscoverResponse::decode(&decoded.encode_to_vec()[..]).unwrap();
        assert_eq!(raw, encoded);
    }

    #[test]
    fn not_modified_and_empty_answers_round_trip() {
        for decoded in [
            DiscoverResponse {
                not_modified: true,
                revision: 9,
                instances: Vec::new(),
            },
            DiscoverResponse::default(),
        ] {
            let raw = EncodedDiscoverResponse::decode(&decoded.encode_to_vec()[..]).unwrap();
            assert_eq!(raw.not_modified, decoded.not_modified);
            assert_eq!(raw.revision, decoded.revision);
            assert!(raw.instances.is_empty());
            assert_eq!(raw.encode_to_vec(), decoded.encode_to_vec());
        }
    }

    #[test]
    fn a_truncated_answer_is_an_error() {
        let decoded = DiscoverResponse {
            not_modified: false,
            revision: 7,
            instances: vec![instance("a")],
        };
        let bytes = decoded.encode_to_vec();
        assert!(EncodedDiscoverResponse::decode(&bytes[..bytes.len() - 3]).is_err());
    }
}
