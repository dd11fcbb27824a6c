"""A client process that sends images built to be costly to decode (tests/reliability only).

``python -m tests.reliability.costly_client HOST:PORT MODEL CLIENTS ROUNDS``
waits for a line on stdin (after printing "ready"), then runs CLIENTS
concurrent senders, each sending every construction of
:func:`hostile_images` ROUNDS times through ``Classify``, and prints one JSON
line: how many were sent, the latency of each correct refusal
(INVALID_ARGUMENT with the expected phrase) and anything else that came back.
A process of its own, so that serialising its megabytes of requests does not
delay the well-behaved client it runs beside.
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import grpc.aio

from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cgrpc
from tests.helpers import costly_images as costly


def hostile_images() -> list[tuple[str, bytes, str]]:
    """(name, image, a phrase of the refusal)."""
    jpeg = costly.save(costly.noise(64, 48), "JPEG", quality=90)
    progressive = costly.save(costly.noise(64, 48), "JPEG", quality=90, progressive=True)
    png = costly.save(costly.noise(64, 48), "PNG")
    gif = costly.save(costly.noise(64, 48).convert("P"), "GIF")
    webp = costly.save(costly.noise(64, 48), "WEBP", lossless=True)
    exif = b"Exif\x00\x00" + costly.tiff_directory(65535)
    rle = "RLE-compressed BMPs are accepted up to 262144 pixels"
    return [
        ("rle8-bmp-6300", costly.bmp_rle8_rows(6300, 6300), rle),
        ("rle4-bmp-1000", costly.bmp_rle4_runs(1000, 1000), rle),
        (
            "jpeg-8mb-of-comments",
            costly.jpeg_with_comments(jpeg, 2_000_000),
            "more than 1024 marker segments",
        ),
        ("jpeg-fill-bytes", costly.jpeg_with_fill_bytes(jpeg, 1_000_000), "padding or stray bytes"),
        (
            "jpeg-210-scans",
            costly.progressive_jpeg_with_scans(progressive, 200),
            "has 210 scans; at most 100",
        ),
        ("png-300k-chunks", costly.png_with_chunks(png, 300_000, "before"), "chunks; at most"),
        ("png-300k-idat-chunks", costly.png_with_chunks(png, 300_000, "idat"), "chunks; at most"),
        (
            "gif-300k-extensions",
            costly.gif_with_extension_blocks(gif, 300_000),
            "more than 4096 extension blocks",
        ),
        ("webp-300k-chunks", costly.webp_with_chunks(webp, 300_000), "chunks; at most"),
        ("webp-6300", costly.webp_solid(6300, 6300), "(max_decoded_pixels)"),
        ("png-6300", costly.png_solid(6300, 6300), "(max_decoded_pixels)"),
        (
            "png-exif-65535-entries",
            costly.save(costly.noise(64, 48), "PNG", exif=exif),
            "EXIF block has 65535 entries",
        ),
    ]


async def run(
    address: str, model: str, clients: int, rounds: int, hostile: list[tuple[str, bytes, str]]
) -> dict:
    refusals: list[float] = []
    wrong: list[str] = []
    sent = 0
    options = [("grpc.max_send_message_length", 64 * 2**20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = cgrpc.ImageClassifierStub(channel)
        loop = asyncio.get_running_loop()

        async def sender(offset: int) -> None:
            nonlocal sent
            order = hostile[offset:] + hostile[:offset]
            for _ in range(rounds):
                for name, data, phrase in order:
                    sent += 1
                    start = loop.time()
                    try:
                        await stub.Classify(cpb.ClassifyRequest(model=model, image=data), timeout=60)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and phrase in (exc.details() or ""):
                            refusals.append(loop.time() - start)
                        else:
                            wrong.append(f"{name}: {exc.code().name} {exc.details()}")
                    else:
                        wrong.append(f"{name}: answered OK")

        await asyncio.gather(*(sender(i * 3) for i in range(clients)))
    return {
        "sent": sent,
        "refusals_s": refusals,
        "wrong": wrong,
        "bytes_per_round": sum(len(d) for _, d, _ in hostile),
    }


def main() -> None:
    address, model, clients, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    hostile = hostile_images()  # built before the signal
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    print(json.dumps(asyncio.run(run(address, model, clients, rounds, hostile))), flush=True)


if __name__ == "__main__":
    main()
