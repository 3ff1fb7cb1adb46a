// lowbit demo: train an MLP whose hidden layers are 8-bit (lowbit::nn::Q8Linear) on Fashion-MNIST next
// to its fp32 twin (torch::nn::Linear everywhere), then compare test accuracy, training time and weight
// bytes. Both models start from the same weights and see the same batches in the same order, so the
// difference between those two rows is the quantization alone. A third model, a small CNN computing with
// 4-bit weights and activations (lowbit::nn::Q4Conv2d, Q4Linear; fp32 head), is trained the same way
// (same epochs, batches, optimiser) and shown in the same table. Last, the trained fp32 MLP is compressed
// weight-only (hidden layers to 4 and 2 bits per weight, round-to-nearest, lowbit's wq kernels) without
// retraining: accuracy, bytes and the time of the test pass for every model in one table.
//
//   lowbit_demo [--data DIR] [--epochs N] [--device cpu|cuda] [--batch N] [--lr F] [--seed N]
//
// The dataset is the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist, IDX files
// gzipped); --data DIR or $LOWBIT_FASHION_MNIST point elsewhere.
#include <lowbit/nn.h>
#include <lowbit/ops.h>
#include <torch/torch.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr const char* kDefaultDataDir = "/usr/share/datasets/fashion-mnist";
constexpr int kExitBadUsage = 2, kExitNoData = 3, kExitFailed = 1;

struct Config {
  std::string data_dir;
  int64_t epochs = 1, batch = 128, seed = 0;
  double lr = 1e-3;
  std::string device;  // empty: cuda if available, else cpu
};

// A missing or malformed dataset: reported as a message, not a crash.
struct DataError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ----------------------------------------------------------------------------------------------------
// Fashion-MNIST: IDX files (big-endian header: magic, dims; then uint8 payload), gzipped.

std::vector<uint8_t> read_gz(const std::string& path) {
  if (!std::filesystem::exists(path)) throw DataError("missing file " + path);
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) throw DataError("cannot open " + path);
  std::vector<uint8_t> out;
  std::vector<char> buf(1 << 20);
  int n;
  while ((n = gzread(f, buf.data(), unsigned(buf.size()))) > 0) out.insert(out.end(), buf.data(), buf.data() + n);
  int err = 0;
  const std::string msg = n < 0 ? gzerror(f, &err) : "";
  gzclose(f);
  if (n < 0) throw DataError("cannot decompress " + path + ": " + msg);
  return out;
}

uint32_t be32(const std::vector<uint8_t>& b, size_t at) {
  return uint32_t(b[at]) << 24 | uint32_t(b[at + 1]) << 16 | uint32_t(b[at + 2]) << 8 | uint32_t(b[at + 3]);
}

// (n, 784) uint8 images or (n,) uint8 labels, checked against the IDX header.
torch::Tensor read_idx(const std::string& path, int ndim) {
  const auto bytes = read_gz(path);
  const size_t header = 4 + 4 * size_t(ndim);
  const uint32_t magic = 0x800u + uint32_t(ndim);  // type 0x08 = uint8
  if (bytes.size() < header || be32(bytes, 0) != magic)
    throw DataError(path + " is not an IDX uint8 file with " + std::to_string(ndim) + " dimension(s)");
  int64_t n = be32(bytes, 4), row = 1;
  for (int d = 1; d < ndim; ++d) row *= be32(bytes, 4 + 4 * size_t(d));
  if (bytes.size() != header + size_t(n * row))
    throw DataError(path + ": payload of " + std::to_string(bytes.size() - header) + " bytes, header says " +
                    std::to_string(n * row));
  auto t = torch::empty(ndim == 1 ? std::vector<int64_t>{n} : std::vector<int64_t>{n, row}, torch::kUInt8);
  std::copy(bytes.begin() + long(header), bytes.end(), t.data_ptr<uint8_t>());
  return t;
}

struct Split {
  torch::Tensor images;  // (n, 784) float32, normalised
  torch::Tensor labels;  // (n,) int64
};

struct Dataset {
  Split train, test;
};

Dataset load_fashion_mnist(const std::string& dir, const torch::Device& device) {
  auto file = [&](const char* name) { return (std::filesystem::path(dir) / name).string(); };
  auto train_x = read_idx(file("train-images-idx3-ubyte.gz"), 3).to(torch::kFloat32).div_(255);
  auto test_x = read_idx(file("t10k-images-idx3-ubyte.gz"), 3).to(torch::kFloat32).div_(255);
  auto train_y = read_idx(file("train-labels-idx1-ubyte.gz"), 1).to(torch::kInt64);
  auto test_y = read_idx(file("t10k-labels-idx1-ubyte.gz"), 1).to(torch::kInt64);
  if (train_x.size(0) != train_y.size(0) || test_x.size(0) != test_y.size(0) || train_x.size(1) != 784)
    throw DataError("image and label files in " + dir + " do not match");
  // One mean and std from the training set, applied to both splits (the test set stays unseen).
  const auto mean = train_x.mean(), std = train_x.std();
  auto norm = [&](const torch::Tensor& x) { return ((x - mean) / std).to(device); };
  return {{norm(train_x), train_y.to(device)}, {norm(test_x), test_y.to(device)}};
}

// ----------------------------------------------------------------------------------------------------
// The two models: 784 -> 512 -> 256 -> 10, ReLU between; Hidden is Q8Linear or Linear, the head is fp32.

template <class Hidden>
struct MLPImpl : torch::nn::Module {
  MLPImpl(Hidden a, Hidden b, torch::nn::Linear h)
      : fc1(register_module("fc1", a)), fc2(register_module("fc2", b)), head(register_module("head", h)) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return head(torch::relu(fc2(torch::relu(fc1(x)))));
  }
  Hidden fc1, fc2;
  torch::nn::Linear head;
};

using Q8MLP = std::shared_ptr<MLPImpl<lowbit::nn::Q8Linear>>;
using FloatMLP = std::shared_ptr<MLPImpl<torch::nn::Linear>>;

FloatMLP make_float_mlp(const torch::Device& d) {
  auto lin = [&](int64_t k, int64_t n) { return torch::nn::Linear(torch::nn::LinearOptions(k, n)); };
  auto m = std::make_shared<MLPImpl<torch::nn::Linear>>(lin(784, 512), lin(512, 256), lin(256, 10));
  m->to(d);
  return m;
}

// Same starting point as `twin`: Q8Linear has no output bias (its bias_a shifts the input), so the
// hidden weights and the whole head are copied; the fp32 hidden biases have no counterpart.
// int8_backward: the hidden layers' input gradients on the int8 GEMM (SwitchBack), to show its accuracy.
Q8MLP make_q8_mlp(const FloatMLP& twin, const torch::Device& d, bool int8_backward = false) {
  auto q8 = [&](int64_t k, int64_t n) {
    return lowbit::nn::Q8Linear(lowbit::nn::Q8LinearOptions(k, n).device(d).int8_backward(int8_backward));
  };
  auto m = std::make_shared<MLPImpl<lowbit::nn::Q8Linear>>(q8(784, 512), q8(512, 256),
                                                          torch::nn::Linear(torch::nn::LinearOptions(256, 10)));
  m->head->to(d);
  torch::NoGradGuard no_grad;
  m->fc1->weight.copy_(twin->fc1->weight);
  m->fc2->weight.copy_(twin->fc2->weight);
  m->head->weight.copy_(twin->head->weight);
  m->head->bias.copy_(twin->head->bias);
  return m;
}

// Bytes of the three weight matrices as stored for inference: int8 codes for a Q8 layer that holds them.
int64_t weight_bytes(const Q8MLP& m) {
  auto q = [](const lowbit::nn::Q8Linear& l) { return l->has_qweight() ? l->qweight.nbytes() : l->weight.nbytes(); };
  return int64_t(q(m->fc1) + q(m->fc2) + m->head->weight.nbytes());
}
int64_t weight_bytes(const FloatMLP& m) {
  return int64_t(m->fc1->weight.nbytes() + m->fc2->weight.nbytes() + m->head->weight.nbytes());
}

// ----------------------------------------------------------------------------------------------------
// The 4-bit CNN: conv3x3(1->kC1, pad 1) -> ReLU -> maxpool 2 -> conv3x3(kC1->kC2, pad 1) -> ReLU -> maxpool 2
// -> flatten -> Q4Linear(kC2*7*7 -> 128) -> ReLU -> fp32 Linear(128 -> 10). The first conv sees the
// normalised image: every conv and hidden layer is 4-bit, only the 10-way head stays fp32 (as in the MLPs).

constexpr int64_t kC1 = 16, kC2 = 32, kCnnHidden = 128;

struct Q4CNNImpl : torch::nn::Module {
  using ConvOpts = lowbit::nn::Q4Conv2dOptions;
  explicit Q4CNNImpl(const torch::Device& d)
      : conv1(register_module("conv1", lowbit::nn::Q4Conv2d(ConvOpts(1, kC1, 3).padding(1).device(d)))),
        conv2(register_module("conv2", lowbit::nn::Q4Conv2d(ConvOpts(kC1, kC2, 3).padding(1).device(d)))),
        fc(register_module("fc", lowbit::nn::Q4Linear(lowbit::nn::Q4LinearOptions(kC2 * 7 * 7, kCnnHidden).device(d)))),
        head(register_module("head", torch::nn::Linear(kCnnHidden, 10))) {
    head->to(d);
  }
  torch::Tensor forward(const torch::Tensor& images) {  // (n, 784) normalised pixels
    auto x = images.view({-1, 1, 28, 28});
    x = torch::max_pool2d(torch::relu(conv1(x)), 2);
    x = torch::max_pool2d(torch::relu(conv2(x)), 2);
    return head(torch::relu(fc(x.flatten(1))));
  }
  lowbit::nn::Q4Conv2d conv1, conv2;
  lowbit::nn::Q4Linear fc;
  torch::nn::Linear head;
};
using Q4CNN = std::shared_ptr<Q4CNNImpl>;

// As stored for inference: int4 pairs (half a byte per weight; conv1, with one input channel, pads each
// pair: a byte per weight) for the 4-bit layers that hold them, fp32 for the head.
int64_t weight_bytes(const Q4CNN& m) {
  auto q = [](const auto& l) { return l->has_qweight() ? l->qweight.nbytes() : l->weight.nbytes(); };
  return int64_t(q(m->conv1) + q(m->conv2) + q(m->fc) + m->head->weight.nbytes());
}

// Everything the model keeps: parameters and buffers (biases, scales, placeholders included).
int64_t state_bytes(torch::nn::Module& m) {
  int64_t b = 0;
  for (const auto& p : m.parameters()) b += int64_t(p.nbytes());
  for (const auto& t : m.buffers()) b += int64_t(t.nbytes());
  return b;
}

// ----------------------------------------------------------------------------------------------------
// Progress bar on stderr: redrawn in place on a terminal, one line per epoch otherwise (logs stay short).

class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total)
      : label_(std::move(label)), total_(total), tty_(isatty(fileno(stderr))), start_(Clock::now()), last_(start_) {}

  // True when a redraw is due; the caller then reads the loss (a device sync) and calls draw().
  bool due() const { return tty_ && Clock::now() - last_ > std::chrono::milliseconds(100); }

  void draw(int64_t done, double loss, bool final = false) {
    last_ = Clock::now();
    const double secs = std::chrono::duration<double>(last_ - start_).count();
    constexpr int kWidth = 30;
    const int fill = int(kWidth * done / std::max<int64_t>(total_, 1));
    std::fprintf(stderr, "%s%-22s [%s%s] %3d%% %6lld/%lld  loss %.4f  %7.0f items/s%s", tty_ ? "\r" : "",
                 label_.c_str(), std::string(size_t(fill), '#').c_str(), std::string(size_t(kWidth - fill), '.').c_str(),
                 int(100 * done / std::max<int64_t>(total_, 1)), (long long)done, (long long)total_, loss,
                 done / std::max(secs, 1e-9), final ? "\n" : "");
    std::fflush(stderr);
  }

 private:
  using Clock = std::chrono::steady_clock;
  std::string label_;
  int64_t total_;
  bool tty_;
  Clock::time_point start_, last_;
};

void sync(const torch::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize();
}

// Adam on cross-entropy; batches drawn from a permutation seeded by cfg.seed, identical for every model.
// Returns the training seconds (data already on the device; the progress bar's syncs included).
template <class Model>
double train(Model& model, const Split& data, const Config& cfg, const std::string& name, const torch::Device& d) {
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(cfg.lr));
  model->train();
  std::mt19937_64 rng(uint64_t(cfg.seed));
  const int64_t n = data.images.size(0);
  std::vector<int64_t> order(size_t(n), 0);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t epoch = 0; epoch < cfg.epochs; ++epoch) {
    std::iota(order.begin(), order.end(), int64_t(0));
    std::shuffle(order.begin(), order.end(), rng);
    const auto perm = torch::from_blob(order.data(), {n}, torch::kInt64).to(d);
    ProgressBar bar(name + " epoch " + std::to_string(epoch + 1) + "/" + std::to_string(cfg.epochs), n);
    // The running loss stays on the device; reading it syncs, so only when the bar is redrawn.
    auto loss_sum = torch::zeros({}, torch::TensorOptions().device(d));
    int64_t steps = 0, done = 0;
    for (int64_t start = 0; start < n; start += cfg.batch) {
      const auto idx = perm.slice(0, start, std::min(start + cfg.batch, n));
      const auto x = data.images.index_select(0, idx), y = data.labels.index_select(0, idx);
      opt.zero_grad();
      auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
      loss.backward();
      opt.step();
      loss_sum += loss.detach();
      ++steps;
      done += idx.size(0);
      if (bar.due()) bar.draw(done, loss_sum.item<double>() / double(steps));
    }
    bar.draw(done, loss_sum.item<double>() / double(steps), /*final=*/true);
  }
  sync(d);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Weight-only compression of the trained fp32 MLP (the LLM workflow on a small model): its two hidden
// layers quantized round-to-nearest to `bits` per weight in groups of 32 input channels (MBWQ layer-mix
// format: packed words, fp32 scales and zeros, w = s*q - z), run through lowbit's wq_linear kernels; the
// head stays fp32. No retraining.
struct WeightOnlyLayer {
  torch::Tensor qweight, scales, zeros, g_idx, bias;
  int64_t bits = 4, K = 0;
  WeightOnlyLayer(const torch::nn::Linear& lin, int64_t b) : bits(b), K(lin->weight.size(1)) {
    constexpr int64_t kGroup = 32;
    auto [codes, s, z] = lowbit::ops::wq_quantize_rtn(lin->weight.detach(), bits, kGroup, "float_zero");
    qweight = lowbit::ops::wq_pack(codes, {bits}, {K});
    scales = s;
    zeros = z;
    g_idx = torch::arange(K, lin->weight.options().dtype(torch::kInt32)).div(kGroup, "floor").to(torch::kInt32);
    bias = lin->bias.detach();
  }
  torch::Tensor forward(const torch::Tensor& x) const {
    return lowbit::ops::wq_linear(x, qweight, scales, zeros, g_idx, std::nullopt, std::nullopt, {bits}, {K},
                                  /*asym=*/false, bias);
  }
  int64_t weight_bytes() const { return int64_t(qweight.nbytes() + scales.nbytes() + zeros.nbytes()); }
};

struct WeightOnlyMLPImpl : torch::nn::Module {
  WeightOnlyMLPImpl(const FloatMLP& f, int64_t bits) : fc1(f->fc1, bits), fc2(f->fc2, bits), head(f->head) {}
  torch::Tensor forward(const torch::Tensor& x) { return head(torch::relu(fc2.forward(torch::relu(fc1.forward(x))))); }
  WeightOnlyLayer fc1, fc2;
  torch::nn::Linear head;
};
using WeightOnlyMLP = std::shared_ptr<WeightOnlyMLPImpl>;

int64_t weight_bytes(const WeightOnlyMLP& m) {
  return m->fc1.weight_bytes() + m->fc2.weight_bytes() + int64_t(m->head->weight.nbytes());
}

template <class Model>
double accuracy(Model& model, const Split& data) {
  model->eval();
  torch::NoGradGuard no_grad;
  auto correct = torch::zeros({}, torch::TensorOptions().dtype(torch::kInt64).device(data.labels.device()));
  const int64_t n = data.images.size(0);
  for (int64_t start = 0; start < n; start += 1000) {
    const auto x = data.images.slice(0, start, std::min(start + 1000, n));
    const auto y = data.labels.slice(0, start, std::min(start + 1000, n));
    correct += model->forward(x).argmax(1).eq(y).sum();
  }
  return 100.0 * double(correct.item<int64_t>()) / double(n);
}

// ----------------------------------------------------------------------------------------------------

void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--data DIR] [--epochs N] [--device cpu|cuda] [--batch N] [--lr F] [--seed N]\n"
               "  DIR holds {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (default: $LOWBIT_FASHION_MNIST,\n"
               "  else %s)\n",
               argv0, kDefaultDataDir);
}

// Parses argv into cfg; returns false (after a message) on bad usage.
bool parse_args(int argc, char** argv, Config& cfg) {
  const char* env = std::getenv("LOWBIT_FASHION_MNIST");
  cfg.data_dir = env && *env ? env : kDefaultDataDir;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    try {
      if (a == "-h" || a == "--help") {
        usage(argv[0]);
        std::exit(0);
      } else if (a == "--data") {
        cfg.data_dir = value();
      } else if (a == "--epochs") {
        cfg.epochs = std::stoll(value());
      } else if (a == "--batch") {
        cfg.batch = std::stoll(value());
      } else if (a == "--lr") {
        cfg.lr = std::stod(value());
      } else if (a == "--seed") {
        cfg.seed = std::stoll(value());
      } else if (a == "--device") {
        cfg.device = value();
        if (cfg.device != "cpu" && cfg.device != "cuda") throw std::invalid_argument("--device must be cpu or cuda");
      } else {
        throw std::invalid_argument("unknown argument " + a);
      }
    } catch (const std::exception& e) {  // std::stoll and friends throw on non-numbers too
      std::fprintf(stderr, "lowbit_demo: %s (%s)\n", e.what(), a.c_str());
      usage(argv[0]);
      return false;
    }
  }
  if (cfg.epochs < 1 || cfg.batch < 1 || !(cfg.lr > 0)) {
    std::fprintf(stderr, "lowbit_demo: --epochs and --batch must be >= 1 and --lr > 0\n");
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  if (!parse_args(argc, argv, cfg)) return kExitBadUsage;
  if (cfg.device.empty()) cfg.device = torch::cuda::is_available() ? "cuda" : "cpu";
  if (cfg.device == "cuda" && !torch::cuda::is_available()) {
    std::fprintf(stderr, "lowbit_demo: --device cuda, but torch sees no CUDA device\n");
    return kExitBadUsage;
  }
  const torch::Device device(cfg.device);

  try {
    Dataset data;
    try {
      data = load_fashion_mnist(cfg.data_dir, device);
    } catch (const DataError& e) {
      std::fprintf(stderr,
                   "lowbit_demo: Fashion-MNIST not found or unreadable: %s\n"
                   "  install it with `apt-get install dataset-fashion-mnist`, or point --data DIR or\n"
                   "  LOWBIT_FASHION_MNIST at a directory with the four *-ubyte.gz files.\n",
                   e.what());
      return kExitNoData;
    }
    std::printf("Fashion-MNIST: %lld train / %lld test images from %s; device %s, %d CPU threads\n",
                (long long)data.train.images.size(0), (long long)data.test.images.size(0), cfg.data_dir.c_str(),
                cfg.device.c_str(), torch::get_num_threads());
    std::printf("MLP 784-512-256-10; CNN conv3x3 1-%lld-%lld + maxpool, %lld-%lld-10; %lld epoch(s), batch %lld, "
                "Adam lr %g, seed %lld\n", (long long)kC1, (long long)kC2, (long long)(kC2 * 7 * 7),
                (long long)kCnnHidden, (long long)cfg.epochs, (long long)cfg.batch, cfg.lr, (long long)cfg.seed);
    std::fflush(stdout);

    torch::manual_seed(uint64_t(cfg.seed));
    auto fp32 = make_float_mlp(device);
    auto q8 = make_q8_mlp(fp32, device);
    auto q8i = make_q8_mlp(fp32, device, /*int8_backward=*/true);  // same start as q8
    auto cnn = std::make_shared<Q4CNNImpl>(device);  // its own initial weights: no fp32 twin to copy

    const double q8_secs = train(q8, data.train, cfg, "Q8 (lowbit)", device);
    const double q8i_secs = train(q8i, data.train, cfg, "Q8 int8 bwd (lowbit)", device);
    const double fp32_secs = train(fp32, data.train, cfg, "fp32 (torch)", device);
    const double cnn_secs = train(cnn, data.train, cfg, "Q4 CNN (lowbit)", device);

    // Inference form of the Q8 model: int8 codes only, the float weights released.
    q8->fc1->generate_quantized_weight(/*qweight_only=*/true);
    q8->fc2->generate_quantized_weight(/*qweight_only=*/true);
    q8i->fc1->generate_quantized_weight(/*qweight_only=*/true);
    q8i->fc2->generate_quantized_weight(/*qweight_only=*/true);
    cnn->conv1->generate_quantized_weight(/*qweight_only=*/true);
    cnn->conv2->generate_quantized_weight(/*qweight_only=*/true);
    cnn->fc->generate_quantized_weight(/*qweight_only=*/true);
    // Test-set accuracy and the time of that pass (10000 images, batches of 1000, no grad).
    auto timed = [&](auto& model, double* ms) {
      sync(device);
      const auto t0 = std::chrono::steady_clock::now();
      const double acc = accuracy(model, data.test);
      sync(device);
      *ms = 1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      return acc;
    };
    auto wo4 = std::make_shared<WeightOnlyMLPImpl>(fp32, 4);
    auto wo2 = std::make_shared<WeightOnlyMLPImpl>(fp32, 2);
    double q8_ms = 0, q8i_ms = 0, fp32_ms = 0, cnn_ms = 0, wo4_ms = 0, wo2_ms = 0;
    accuracy(fp32, data.test);  // warm-up (allocator, kernels)
    const double q8_acc = timed(q8, &q8_ms), q8i_acc = timed(q8i, &q8i_ms), fp32_acc = timed(fp32, &fp32_ms);
    const double cnn_acc = timed(cnn, &cnn_ms), wo4_acc = timed(wo4, &wo4_ms), wo2_acc = timed(wo2, &wo2_ms);

    std::printf("\n| model | test accuracy %% | train s | test pass ms | weight bytes | state bytes |\n");
    std::printf("|---|---:|---:|---:|---:|---:|\n");
    std::printf("| Q8Linear MLP (int8 hidden, QAT) | %.2f | %.1f | %.1f | %lld | %lld |\n", q8_acc, q8_secs, q8_ms,
                (long long)weight_bytes(q8), (long long)state_bytes(*q8));
    std::printf("| Q8Linear MLP, int8 backward (SwitchBack) | %.2f | %.1f | %.1f | %lld | %lld |\n", q8i_acc, q8i_secs,
                q8i_ms, (long long)weight_bytes(q8i), (long long)state_bytes(*q8i));
    std::printf("| fp32 MLP (torch Linear) | %.2f | %.1f | %.1f | %lld | %lld |\n", fp32_acc, fp32_secs, fp32_ms,
                (long long)weight_bytes(fp32), (long long)state_bytes(*fp32));
    std::printf("| Q4 CNN (int4 conv + hidden, QAT) | %.2f | %.1f | %.1f | %lld | %lld |\n", cnn_acc, cnn_secs,
                cnn_ms, (long long)weight_bytes(cnn), (long long)state_bytes(*cnn));
    std::printf("| fp32 MLP, hidden weight-only 4-bit g32 (RTN) | %.2f | - | %.1f | %lld | - |\n", wo4_acc, wo4_ms,
                (long long)weight_bytes(wo4));
    std::printf("| fp32 MLP, hidden weight-only 2-bit g32 (RTN) | %.2f | - | %.1f | %lld | - |\n", wo2_acc, wo2_ms,
                (long long)weight_bytes(wo2));
    std::printf("\nweight bytes: the weight tensors as stored after generate_quantized_weight(qweight_only=true):\n"
                "Q8 hidden layers 1 byte per weight; Q4 layers int4 pairs, half a byte per weight (the 1-channel\n"
                "first conv: a byte, half of each pair is padding); heads fp32; weight-only rows: packed words plus\n"
                "fp32 scales and zeros per group of 32 (the trained fp32 MLP compressed after training, no\n"
                "retraining); they pay off at a few rows per call (LLM decode), while a 1000-row batch dequantizes each\n"
                "layer per call. state bytes: all parameters and buffers. test pass: 10000 images, batches of 1000.\n");
  } catch (const c10::Error& e) {  // torch's own errors: the message without the C++ backtrace
    std::fprintf(stderr, "lowbit_demo: failed: %s\n", e.what_without_backtrace());
    return kExitFailed;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lowbit_demo: failed: %s\n", e.what());
    return kExitFailed;
  }
  return 0;
}
