// Explains a model from C++ with no Python: loads an explainable TorchScript archive written by
// lrpcpp.deploy.export_archive, runs its forward on given input embeddings, backpropagates from one
// logit per batch item and prints the relevance of every token.
//
//   lrpcpp_explain ARCHIVE INPUTS [--target ID] [--position P]
//
// ARCHIVE  the archive (a TorchScript module: inputs_embeds [batch, seq, hidden] and
//          attention_mask [batch, seq] -> logits [batch, seq, vocab] or [batch, classes]).
// INPUTS   a file written in Python with
//            torch.save({"inputs_embeds": embeds, "attention_mask": mask}, path)
//          ("attention_mask" may be left out: no padding), or with "input_ids" [batch, seq] instead
//          of "inputs_embeds": the archive's method embed(input_ids) looks them up.
// --target ID    the explained class or token id, for every item (default: each item's top logit).
// --position P   for a language model, the position whose next-token logits are explained
//                (default: each item's last unmasked position).
//
// The archive computes relevance in gradient-times-input form (AttnLRP, or CP-LRP, as chosen when it
// was exported): the explained logit is seeded with 1 and the relevance of the embeddings is
// inputs_embeds * inputs_embeds.grad. The lrpcpp operators it calls, and their relevance backwards,
// are registered by liblrpcpp, which this program links (lrpcpp::lrpcpp).
//
// Output, one block per batch item:
//   item <b> target <id> position <p> logit <value>
//   relevance <r_0> <r_1> ... <r_{seq-1}>        (summed over the hidden dim; 0 for padding)
#include <torch/script.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string archive, inputs;
  std::optional<int64_t> target, position;
};

[[noreturn]] void usage(const char* why) {
  std::cerr << "lrpcpp_explain: " << why << "\n"
            << "usage: lrpcpp_explain ARCHIVE INPUTS [--target ID] [--position P]\n";
  std::exit(2);
}

int64_t parse_int(const std::string& flag, const char* text) {
  try {
    size_t used = 0;
    const int64_t v = std::stoll(text, &used);
    if (used == std::string(text).size()) return v;
  } catch (const std::exception&) {
  }
  usage((flag + " expects an integer, got '" + text + "'").c_str());
}

Options parse(int argc, char** argv) {
  Options o;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--target" || a == "--position") {
      if (i + 1 >= argc) usage((a + " needs a value").c_str());
      (a == "--target" ? o.target : o.position) = parse_int(a, argv[++i]);
    } else if (!a.empty() && a[0] == '-') {
      usage(("unknown option " + a).c_str());
    } else {
      positional.push_back(a);
    }
  }
  if (positional.size() != 2) usage("expected ARCHIVE and INPUTS");
  o.archive = positional[0];
  o.inputs = positional[1];
  return o;
}

// {"inputs_embeds" or "input_ids": Tensor, "attention_mask": Tensor}, as torch.save wrote it
std::pair<at::Tensor, at::Tensor> read_inputs(const std::string& path, torch::jit::Module& model) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open " + path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const auto value = torch::pickle_load(bytes);
  if (!value.isGenericDict()) throw std::runtime_error(path + ": expected a dict saved with torch.save");
  at::Tensor embeds, ids, mask;
  for (const auto& item : value.toGenericDict()) {
    const auto key = item.key().toStringRef();
    if (key == "inputs_embeds") embeds = item.value().toTensor();
    if (key == "input_ids") ids = item.value().toTensor();
    if (key == "attention_mask") mask = item.value().toTensor();
  }
  if (!embeds.defined() && ids.defined()) {
    torch::NoGradGuard no_grad;  // the embeddings are the leaf of the explanation
    embeds = model.get_method("embed")({ids}).toTensor();
  }
  if (!embeds.defined() || embeds.dim() != 3 || !embeds.is_floating_point()) {
    throw std::runtime_error(path +
                             ": expected 'inputs_embeds', a floating-point [batch, seq, hidden] tensor, "
                             "or 'input_ids' [batch, seq]");
  }
  if (!mask.defined()) mask = torch::ones({embeds.size(0), embeds.size(1)}, torch::kLong);
  if (mask.sizes() != embeds.sizes().slice(0, 2)) {
    throw std::runtime_error(path + ": 'attention_mask' must be [batch, seq], the first two dims of 'inputs_embeds'");
  }
  return {embeds, mask};
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  try {
    torch::jit::Module model = torch::jit::load(opt.archive);
    model.eval();
    auto [embeds, mask] = read_inputs(opt.inputs, model);
    const int64_t batch = embeds.size(0), seq = embeds.size(1);

    // the leaf whose gradient, times itself, is the relevance
    embeds = embeds.detach().requires_grad_(true);
    at::Tensor logits = model.forward({embeds, mask}).toTensor();

    at::Tensor positions;  // the explained position of each item (language models)
    if (logits.dim() == 3) {
      if (opt.position) {
        if (*opt.position < 0 || *opt.position >= seq) usage("--position is outside the sequence");
        positions = torch::full({batch}, *opt.position, torch::kLong);
      } else {
        // the last unmasked position; the last position where the whole row is masked
        const auto index = torch::arange(seq, torch::kLong).expand({batch, seq});
        positions = torch::where(mask.ne(0), index, -1).amax(1);
        positions = torch::where(positions.lt(0), seq - 1, positions);
      }
      logits = logits.index({torch::arange(batch, torch::kLong), positions});
    } else if (logits.dim() != 2) {
      throw std::runtime_error("the archive returned logits of " + std::to_string(logits.dim()) +
                               " dims; expected [batch, seq, vocab] or [batch, classes]");
    }

    at::Tensor ids;
    if (opt.target) {
      if (*opt.target < 0 || *opt.target >= logits.size(1)) usage("--target is outside the logits");
      ids = torch::full({batch}, *opt.target, torch::kLong);
    } else {
      ids = logits.detach().argmax(1);
    }
    const at::Tensor explained = logits.gather(1, ids.unsqueeze(1)).squeeze(1);

    // gradient-times-input: seed each explained logit with 1, relevance = x * dlogit/dx
    explained.backward(torch::ones_like(explained));
    const at::Tensor relevance = (embeds.detach() * embeds.grad()).sum(-1).to(torch::kDouble);

    std::cout << std::setprecision(9);
    for (int64_t b = 0; b < batch; ++b) {
      std::cout << "item " << b << " target " << ids[b].item<int64_t>() << " position "
                << (positions.defined() ? positions[b].item<int64_t>() : -1) << " logit " << explained[b].item<double>()
                << "\nrelevance";
      for (int64_t t = 0; t < seq; ++t) std::cout << ' ' << relevance[b][t].item<double>();
      std::cout << '\n';
    }
  } catch (const std::exception& e) {
    std::cerr << "lrpcpp_explain: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
