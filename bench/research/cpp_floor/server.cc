// A KServe v2 / Triton gRPC server in C++ that does no work: the floor under any frontend.
//
// bench.research.grpc_stacks starts it as the "cpp" stack, beside a no-op grpc.aio server and
// `svertka serve` on the null model, so the three are driven by the same clients on the
// same cores. It answers ModelInfer for one model ("null": input "input", FP32
// [-1,3,224,224]; output "logits", FP32 [-1,1000]) with the first 1000 input values of
// each row, and enough of the control surface (health, ServerMetadata, ModelMetadata, ModelConfig,
// ModelStatistics) for perf_analyzer and bench.cpu to drive and meter it. Built by
// bench/research/cpp_floor/build.sh with Debian's gRPC (libgrpc++-dev, protobuf-compiler-grpc).
//
//   server PORT        prints "ready" once listening
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "inference/grpc_service.grpc.pb.h"

namespace {

constexpr char kModel[] = "null";
constexpr int64_t kChannels = 3, kSide = 224, kClasses = 1000;

class NullService final : public inference::GRPCInferenceService::Service {
 public:
  grpc::Status ServerLive(grpc::ServerContext*, const inference::ServerLiveRequest*,
                          inference::ServerLiveResponse* response) override {
    response->set_live(true);
    return grpc::Status::OK;
  }

  grpc::Status ServerReady(grpc::ServerContext*, const inference::ServerReadyRequest*,
                           inference::ServerReadyResponse* response) override {
    response->set_ready(true);
    return grpc::Status::OK;
  }

  grpc::Status ModelReady(grpc::ServerContext*, const inference::ModelReadyRequest* request,
                          inference::ModelReadyResponse* response) override {
    response->set_ready(request->name() == kModel);
    return grpc::Status::OK;
  }

  grpc::Status ServerMetadata(grpc::ServerContext*, const inference::ServerMetadataRequest*,
                              inference::ServerMetadataResponse* response) override {
    response->set_name("no-op");
    response->set_version("1");
    return grpc::Status::OK;
  }

  grpc::Status ModelMetadata(grpc::ServerContext*, const inference::ModelMetadataRequest* request,
                             inference::ModelMetadataResponse* response) override {
    if (request->name() != kModel) return Unknown(request->name());
    response->set_name(kModel);
    response->add_versions("1");
    response->set_platform("onnxruntime_onnx");
    auto* input = response->add_inputs();
    input->set_name("input");
    input->set_datatype("FP32");
    for (int64_t d : {int64_t{-1}, kChannels, kSide, kSide}) input->add_shape(d);
    auto* output = response->add_outputs();
    output->set_name("logits");
    output->set_datatype("FP32");
    for (int64_t d : {int64_t{-1}, kClasses}) output->add_shape(d);
    return grpc::Status::OK;
  }

  grpc::Status ModelConfig(grpc::ServerContext*, const inference::ModelConfigRequest* request,
                           inference::ModelConfigResponse* response) override {
    if (request->name() != kModel) return Unknown(request->name());
    auto* config = response->mutable_config();
    config->set_name(kModel);
    config->set_platform("onnxruntime_onnx");
    config->set_max_batch_size(32);
    auto* input = config->add_input();
    input->set_name("input");
    input->set_data_type(inference::TYPE_FP32);
    for (int64_t d : {kChannels, kSide, kSide}) input->add_dims(d);
    auto* output = config->add_output();
    output->set_name("logits");
    output->set_data_type(inference::TYPE_FP32);
    output->add_dims(kClasses);
    return grpc::Status::OK;
  }

  grpc::Status ModelStatistics(grpc::ServerContext*, const inference::ModelStatisticsRequest* request,
                               inference::ModelStatisticsResponse* response) override {
    if (!request->name().empty() && request->name() != kModel) return Unknown(request->name());
    auto* stats = response->add_model_stats();
    stats->set_name(kModel);
    stats->set_version("1");
    const uint64_t n = requests_.load();
    stats->set_inference_count(n);
    stats->set_execution_count(n);
    auto* batch = stats->add_batch_stats();
    batch->set_batch_size(1);  // every request is its own batch of one row
    batch->mutable_compute_infer()->set_count(n);
    return grpc::Status::OK;
  }

  grpc::Status ModelInfer(grpc::ServerContext*, const inference::ModelInferRequest* request,
                          inference::ModelInferResponse* response) override {
    if (request->model_name() != kModel) return Unknown(request->model_name());
    if (request->inputs_size() != 1 || request->raw_input_contents_size() != 1) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "expected one input, 'input', in raw_input_contents");
    }
    const std::string& raw = request->raw_input_contents(0);
    const size_t row = kChannels * kSide * kSide * sizeof(float);
    if (raw.empty() || raw.size() % row != 0) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "expected FP32 [N,3,224,224]: a multiple of " + std::to_string(row) + " bytes");
    }
    const int64_t rows = static_cast<int64_t>(raw.size() / row);
    response->set_model_name(kModel);
    response->set_model_version("1");
    response->set_id(request->id());
    auto* output = response->add_outputs();
    output->set_name("logits");
    output->set_datatype("FP32");
    output->add_shape(rows);
    output->add_shape(kClasses);
    std::string* logits = response->add_raw_output_contents();
    logits->resize(rows * kClasses * sizeof(float));
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(&(*logits)[r * kClasses * sizeof(float)], raw.data() + r * row, kClasses * sizeof(float));
    }
    requests_.fetch_add(1);
    return grpc::Status::OK;
  }

 private:
  static grpc::Status Unknown(const std::string& name) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown model '" + name + "'; this server has 'null'");
  }

  std::atomic<uint64_t> requests_{0};
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s PORT\n", argv[0]);
    return 2;
  }
  NullService service;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(std::string("127.0.0.1:") + argv[1], grpc::InsecureServerCredentials());
  builder.SetMaxReceiveMessageSize(1 << 30);
  builder.SetMaxSendMessageSize(1 << 30);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server) {
    std::fprintf(stderr, "could not listen on port %s\n", argv[1]);
    return 1;
  }
  std::printf("ready\n");
  std::fflush(stdout);
  server->Wait();
  return 0;
}
