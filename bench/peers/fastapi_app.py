"""The naive FastAPI app: one async route that reads the body and runs the model right there (no
thread pool, no batching), served by uvicorn with one worker.

    PYTHONPATH=<repo>:<repo>/bench/peers BTD_BENCH_MODEL=models/btd-resnet50-int8.onnx \
        python bench/peers/fastapi_app.py --port 8080
    curl --data-binary @slice.jpg -H 'Content-Type: image/jpeg' 127.0.0.1:8080/predict
"""

import argparse

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from peer_model import Classifier

app = FastAPI()
model = Classifier()


@app.get("/healthz")
def healthz() -> dict:
    return {"ok": True}


@app.post("/predict")
async def predict(request: Request) -> dict:
    try:
        return model.predict(await request.body())
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    uvicorn.run(app, host="127.0.0.1", port=parser.parse_args().port, log_level="warning")
