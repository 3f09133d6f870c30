//! Fixed fan-out workload for instruction counts: 1 publisher, M multicast subscribers.
//! usage: fanout_workload URL M ROUNDS BATCH client|auto
use std::time::Duration;

use mbws_client::{Client, ClientOptions};
use mbws_proto::mbws::{AckMode, DeliveryMode};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = &args[1];
    let subscribers: usize = args[2].parse().unwrap();
    let rounds: usize = args[3].parse().unwrap();
    let batch: usize = args[4].parse().unwrap();
    let ack_mode = if args[5] == "auto" { AckMode::Auto } else { AckMode::Client };
    let credit = 1000u32;
    let ack_every = u64::from(credit / 4);
    let mut clients: Vec<Client> = (0..subscribers)
        .map(|_| {
            let mut client = Client::connect(url, ClientOptions::default()).unwrap();
            client.subscribe(1, "fan", DeliveryMode::Multicast, ack_mode, credit).unwrap();
            client
        })
        .collect();
    let mut publisher = Client::connect(url, ClientOptions::default()).unwrap();
    let body = vec![7u8; 64];
    let mut received = 0u64;
    for _ in 0..rounds {
        for _ in 0..batch {
            publisher.send("fan", body.clone()).unwrap();
        }
        publisher.flush().unwrap();
        for client in clients.iter_mut() {
            for _ in 0..batch {
                let message = client.next_message(Duration::from_secs(60)).unwrap().expect("a delivery");
                received += 1;
                if ack_mode == AckMode::Client && message.delivery_seq % ack_every == 0 {
                    client.ack(message.delivery_seq, true).unwrap();
                }
            }
            client.flush().unwrap();
        }
    }
    if rounds > 0 {
        let seq = (rounds * batch) as u64;
        publisher.wait_receipt(seq).unwrap();
    }
    println!("deliveries {received}");
}
